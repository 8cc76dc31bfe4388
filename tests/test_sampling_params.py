"""SamplingParams: defaults, and a clear error (naming the field and the value) for every bad value."""

from __future__ import annotations

import math

import pytest

from nanovllm.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.ignore_eos, p.stop_token_ids, p.seed) == \
        (1.0, 1.0, -1, 16, False, None, None)
    assert not p.greedy


def test_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-3).greedy


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(temperature=2), dict(temperature=0.7), dict(top_p=1), dict(top_p=1e-3),
    dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(top_k=50), dict(max_tokens=1), dict(max_tokens=10 ** 6),
    dict(stop_token_ids=[]), dict(stop_token_ids=[1, 2]), dict(seed=0), dict(seed=2 ** 40), dict(seed=-1),
    dict(seed=2 ** 64 - 1), dict(ignore_eos=True),
])
def test_valid(kwargs):
    SamplingParams(**kwargs)


def test_stop_token_ids_tuple_becomes_a_list():
    p = SamplingParams(stop_token_ids=(3, 4))
    assert p.stop_token_ids == [3, 4]


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(temperature=-0.1), ValueError, ["temperature", "-0.1"]),
    (dict(temperature=-1), ValueError, ["temperature"]),
    (dict(temperature=math.nan), ValueError, ["temperature", "nan"]),
    (dict(temperature="0.5"), TypeError, ["temperature", "str"]),
    (dict(temperature=None), TypeError, ["temperature"]),
    (dict(temperature=True), TypeError, ["temperature", "bool"]),
    (dict(top_p=0), ValueError, ["top_p", "0"]),
    (dict(top_p=0.0), ValueError, ["top_p"]),
    (dict(top_p=-0.5), ValueError, ["top_p"]),
    (dict(top_p=1.01), ValueError, ["top_p", "1.01"]),
    (dict(top_p=math.nan), ValueError, ["top_p"]),
    (dict(top_p="1"), TypeError, ["top_p"]),
    (dict(top_k=-2), ValueError, ["top_k", "-2"]),
    (dict(top_k=-100), ValueError, ["top_k"]),
    (dict(top_k=2.5), TypeError, ["top_k", "float"]),
    (dict(top_k=None), TypeError, ["top_k"]),
    (dict(max_tokens=0), ValueError, ["max_tokens", "0"]),
    (dict(max_tokens=-5), ValueError, ["max_tokens"]),
    (dict(max_tokens=1.5), TypeError, ["max_tokens"]),
    (dict(max_tokens=True), TypeError, ["max_tokens"]),
    (dict(max_tokens=None), TypeError, ["max_tokens"]),
    (dict(stop_token_ids=["a"]), TypeError, ["stop_token_ids"]),
    (dict(stop_token_ids=[1.0]), TypeError, ["stop_token_ids"]),
    (dict(seed="x"), TypeError, ["seed"]),
    (dict(seed=1.5), TypeError, ["seed"]),
    (dict(seed=2 ** 64), ValueError, ["seed", str(2 ** 64)]),
    (dict(seed=-(2 ** 63) - 1), ValueError, ["seed"]),
])
def test_invalid(kwargs, exc, words):
    with pytest.raises(exc) as info:
        SamplingParams(**kwargs)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, f"{msg!r} does not mention {w!r}"
