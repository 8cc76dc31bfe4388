"""SamplingParams: defaults, and a clear error (naming the field and the value) for every bad value."""

from __future__ import annotations

import math

import numpy as np
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


def test_stop_token_ids_from_any_iterable_are_read_once():
    """A generator is read once, not consumed by the check and left empty (vLLM takes any iterable too)."""
    assert SamplingParams(stop_token_ids=(t for t in (3, 4))).stop_token_ids == [3, 4]
    assert SamplingParams(stop_token_ids=iter([7])).stop_token_ids == [7]
    p = SamplingParams(stop_token_ids=np.array([5, 6]))
    assert p.stop_token_ids == [5, 6] and all(type(t) is int for t in p.stop_token_ids)


def test_numpy_values_are_taken_as_python_ones():
    p = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9), top_k=np.int64(3),
                       max_tokens=np.int32(4), ignore_eos=np.bool_(True), seed=np.int64(7))
    assert (p.temperature, p.top_k, p.max_tokens, p.ignore_eos, p.seed) == (0.5, 3, 4, True, 7)
    assert type(p.temperature) is float and type(p.top_p) is float and type(p.ignore_eos) is bool
    assert type(p.seed) is int


def test_largest_top_k_is_the_largest_int64():
    """top_k at least the vocabulary size keeps every token; past int64 the sampler cannot hold it."""
    assert SamplingParams(top_k=2 ** 63 - 1).top_k == 2 ** 63 - 1


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(temperature=-0.1), ValueError, ["temperature", "-0.1"]),
    (dict(temperature=-1), ValueError, ["temperature"]),
    (dict(temperature=math.nan), ValueError, ["temperature", "nan"]),
    (dict(temperature="0.5"), TypeError, ["temperature", "str"]),
    (dict(temperature=None), TypeError, ["temperature"]),
    (dict(temperature=True), TypeError, ["temperature", "bool"]),
    (dict(temperature=math.inf), ValueError, ["temperature", "inf"]),
    (dict(temperature=-math.inf), ValueError, ["temperature", "-inf"]),
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
    (dict(top_k=2 ** 63), ValueError, ["top_k", str(2 ** 63), "-1"]),
    (dict(max_tokens=0), ValueError, ["max_tokens", "0"]),
    (dict(max_tokens=-5), ValueError, ["max_tokens"]),
    (dict(max_tokens=1.5), TypeError, ["max_tokens"]),
    (dict(max_tokens=True), TypeError, ["max_tokens"]),
    (dict(max_tokens=None), TypeError, ["max_tokens"]),
    (dict(stop_token_ids=["a"]), TypeError, ["stop_token_ids"]),
    (dict(stop_token_ids=[1.0]), TypeError, ["stop_token_ids"]),
    (dict(stop_token_ids=5), TypeError, ["stop_token_ids", "int"]),
    (dict(stop_token_ids="12"), TypeError, ["stop_token_ids", "str"]),
    (dict(stop_token_ids=[1, None]), TypeError, ["stop_token_ids", "NoneType"]),
    (dict(stop_token_ids=[True]), TypeError, ["stop_token_ids", "bool"]),
    (dict(stop_token_ids=[-1]), ValueError, ["stop_token_ids", "-1"]),
    (dict(ignore_eos="no"), TypeError, ["ignore_eos", "bool", "str"]),
    (dict(ignore_eos=1), TypeError, ["ignore_eos", "int"]),
    (dict(ignore_eos=None), TypeError, ["ignore_eos", "NoneType"]),
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
