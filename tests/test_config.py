"""EngineConfig is the single source of the engine's defaults: LLM, the two command-line tools and the README
all derive from it."""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest

from nanovllm.config import EngineConfig, add_engine_args, engine_kwargs
from nanovllm.utils import cdiv, check_bool, check_int

README = Path(__file__).resolve().parent.parent / "README.md"


def cli_fields():
    return [f for f in fields(EngineConfig) if f.metadata.get("cli", True)]


def test_llm_has_no_defaults_of_its_own():
    from nanovllm.llm import LLM

    params = inspect.signature(LLM.__init__).parameters
    assert list(params) == ["self", "model", "engine_args"]  # everything else is an EngineConfig field


def test_unknown_engine_argument_is_named():
    from nanovllm import LLM

    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['max_num_seq'\]"):
        LLM(max_num_seq=4)


def test_command_line_flags_come_from_the_config():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args([])
    assert EngineConfig(**engine_kwargs(args)) == EngineConfig()  # every default, as the dataclass has it
    args = parser.parse_args(["--max-num-seqs", "8", "--no-enable-prefix-caching", "--enforce-eager",
                              "--num-kvcache-blocks", "12", "--attention-backend", "torch"])
    config = EngineConfig(**engine_kwargs(args))
    assert (config.max_num_seqs, config.enable_prefix_caching, config.enforce_eager) == (8, False, True)
    assert config.num_kvcache_blocks == 12 and config.attention_backend == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "cudnn"])


def test_the_tools_take_the_configs_defaults(monkeypatch):
    """The benchmark and the CLI parse their engine flags with add_engine_args; the benchmark changes one
    default on purpose (nano-vllm's prefill step), and nothing else."""
    import nanovllm.__main__ as cli
    import nanovllm.bench as bench

    seen = {}

    def fake_llm(model, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr("nanovllm.LLM", fake_llm, raising=False)
    monkeypatch.setattr("nanovllm.llm.LLM", fake_llm)
    with pytest.raises(SystemExit):
        cli.main(["hi"])
    expected = {f.name: f.default for f in cli_fields() if f.name != "seed"}
    assert seen == expected
    parser = argparse.ArgumentParser()
    add_engine_args(parser, defaults={"max_num_batched_tokens": bench.BENCH_PREFILL_TOKENS})
    differs = {k: v for k, v in engine_kwargs(parser.parse_args([])).items() if getattr(EngineConfig(), k) != v}
    assert differs == {"max_num_batched_tokens": 16384}


def test_readme_states_every_default():
    """The README's engine-argument list names every field with the dataclass's default."""
    text = README.read_text()
    for f in cli_fields():
        default = f.default if f.default is not MISSING else None
        shown = repr(default) if isinstance(default, str) else str(default)
        assert re.search(rf"`{f.name}={re.escape(shown)}`", text), f"README lacks `{f.name}={shown}`"


def test_check_int_names_the_argument():
    assert check_int("n", np.int64(8), 1) == 8 and type(check_int("n", np.int32(3))) is int
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int("n", True)
    with pytest.raises(TypeError, match="got float"):
        check_int("n", 2.0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int("n", 0, 1)
    with pytest.raises(ValueError, match="n must be <= 5, got 6"):
        check_int("n", 6, maximum=5)
    assert [cdiv(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_numpy_integers_are_taken_where_ints_are():
    from nanovllm import SamplingParams

    p = SamplingParams(max_tokens=np.int64(8), top_k=np.int32(5))
    assert (p.max_tokens, p.top_k) == (8, 5) and type(p.max_tokens) is int
    assert EngineConfig(max_num_seqs=np.int64(4)).max_num_seqs == 4


def test_check_bool_names_the_argument():
    assert check_bool("b", True) is True and check_bool("b", np.bool_(False)) is False
    for value, kind in (("no", "str"), (1, "int"), (0, "int"), (None, "NoneType"), (np.array([True]), "ndarray")):
        with pytest.raises(TypeError, match=f"b must be a bool, got {kind}"):
            check_bool("b", value)


@pytest.mark.parametrize("name", [f.name for f in fields(EngineConfig) if isinstance(f.default, bool)])
@pytest.mark.parametrize("value", ["no", "yes", 0, None])
def test_switches_must_be_bools(name, value):
    """"no" is not taken as True, nor 0 as False: a switch is a bool (numpy's too)."""
    with pytest.raises(TypeError, match=f"{name} must be a bool, got {type(value).__name__}"):
        EngineConfig(**{name: value})
    assert getattr(EngineConfig(**{name: np.bool_(False)}), name) is False


def test_max_model_len_leaves_room_for_a_prompt_and_a_token():
    """A prompt of one token and one generated token need max_model_len >= 2: with 1, no prompt could run."""
    with pytest.raises(ValueError, match="max_model_len must be >= 2, got 1"):
        EngineConfig(max_model_len=1)
    assert EngineConfig(max_model_len=2).max_model_len == 2
