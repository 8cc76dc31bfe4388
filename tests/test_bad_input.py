"""Bad input fails fast and clearly: a ValueError / TypeError (OSError for files) whose message names the
problem, raised before any model step runs; afterwards the same engine still generates correctly with every
KV block free.  Also: an exception inside a step leaves the engine clean and usable."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import hf_greedy

from nanovllm import LLM, SamplingParams

torch.set_num_threads(1)  # tiny models: one thread is fastest, and more spin badly on a busy machine

MAX_MODEL_LEN = 64
GOOD = [7, 3, 99, 250, 11, 42, 8, 300, 1, 5, 77, 123]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    path, hf = tiny_qwen3
    llm = LLM(str(path), max_model_len=MAX_MODEL_LEN, num_kvcache_blocks=32)
    calls = []
    run = llm.runner.run

    def counting_run(batch, *a, **kw):
        calls.append(len(batch.seqs))
        return run(batch, *a, **kw)

    llm.runner.run = counting_run
    return llm, calls, hf_greedy(hf, GOOD, 10)


def assert_clean_and_working(llm, expected):
    bm = llm.block_manager
    assert not llm.scheduler.has_unfinished(), "a rejected request was left queued"
    assert bm.num_free_blocks == bm.num_blocks
    [out] = llm.generate([GOOD], GREEDY, use_tqdm=False)
    assert out.token_ids == expected
    assert bm.num_free_blocks == bm.num_blocks and not llm.scheduler.has_unfinished()


def rejects(engine, prompts, params, exc, *words):
    llm, calls, expected = engine
    before = len(calls)
    with pytest.raises(exc) as info:
        llm.generate(prompts, params, use_tqdm=False)
    assert len(calls) == before, "the engine ran a step before rejecting the input"
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{msg!r} does not mention {w!r}"
    assert_clean_and_working(llm, expected)


# -- prompts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, exc, words", [
    ("", ValueError, ["empty"]),
    ([""], ValueError, ["empty"]),
    ([[]], ValueError, ["empty"]),
    ([], ValueError, ["empty"]),
    ([GOOD, []], ValueError, ["prompt 1", "empty"]),
    ([[5, 512]], ValueError, ["512", "vocab"]),
    ([[5, 10 ** 9]], ValueError, [str(10 ** 9), "vocab"]),
    ([[-1, 5]], ValueError, ["-1", "vocab"]),
    ([[1] * MAX_MODEL_LEN], ValueError, [str(MAX_MODEL_LEN), "max_model_len"]),
    ([[1] * 500], ValueError, ["500", "max_model_len"]),
    (5, TypeError, ["int"]),
    ({"prompt": GOOD}, TypeError, ["dict"]),
    (None, TypeError, ["NoneType"]),
    ([1.0, 2.0], TypeError, ["float"]),
    ([[1.0, 2.0]], TypeError, ["int"]),
    ([[1, 2.5]], TypeError, ["int"]),
    ([[True, False]], TypeError, ["int"]),
    ([GOOD, None], TypeError, ["prompt 1", "NoneType"]),
    ([GOOD, {"a": 1}], TypeError, ["prompt 1", "dict"]),
    ("hello", ValueError, ["tokenizer"]),
    ([GOOD, "hello"], ValueError, ["prompt 1", "tokenizer"]),
    ([GOOD, [600]], ValueError, ["prompt 1", "600"]),  # one bad prompt: nothing runs, not even the good one
], ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_bad_prompts(engine, prompts, exc, words):
    rejects(engine, prompts, GREEDY, exc, *words)


def test_bad_prompt_through_add_request(engine):
    llm, calls, expected = engine
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.add_request([1, 2, 9999], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([], GREEDY)
    assert_clean_and_working(llm, expected)


# -- sampling parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(max_tokens=0), ValueError, ["max_tokens", "0"]),
    (dict(max_tokens=-3), ValueError, ["max_tokens", "-3"]),
    (dict(temperature=-1.0), ValueError, ["temperature", "-1.0"]),
    (dict(temperature=math.nan), ValueError, ["temperature", "nan"]),
    (dict(top_p=0.0), ValueError, ["top_p", "0.0"]),
    (dict(top_p=1.5), ValueError, ["top_p", "1.5"]),
    (dict(top_p=-0.1), ValueError, ["top_p"]),
    (dict(top_k=-2), ValueError, ["top_k", "-2"]),
])
def test_bad_sampling_params_fail_when_made(engine, kwargs, exc, words):
    with pytest.raises(exc) as info:
        SamplingParams(**kwargs)
    for w in words:
        assert w in str(info.value)
    _, _, expected = engine
    assert_clean_and_working(engine[0], expected)


@pytest.mark.parametrize("prompts, params, exc, words", [
    ([GOOD, GOOD, GOOD], [GREEDY, GREEDY], ValueError, ["2 sampling_params", "3 prompts"]),
    ([GOOD], [GREEDY, GREEDY], ValueError, ["2 sampling_params", "1 prompts"]),
    ([GOOD], [], ValueError, ["0 sampling_params"]),
    ([GOOD], {"temperature": 0}, TypeError, ["dict"]),
    ([GOOD], 0.5, TypeError, ["float"]),
    ([GOOD, GOOD], [GREEDY, "greedy"], TypeError, ["SamplingParams"]),
], ids=["too-few", "too-many", "empty-list", "dict", "float", "str-in-list"])
def test_bad_sampling_params_argument(engine, prompts, params, exc, words):
    rejects(engine, prompts, params, exc, *words)


def test_request_that_can_never_fit_in_the_kv_cache(tiny_qwen3):
    path, hf = tiny_qwen3
    llm = LLM(str(path), max_model_len=MAX_MODEL_LEN, num_kvcache_blocks=2)  # 32 tokens of KV
    calls = []
    run = llm.runner.run
    llm.runner.run = lambda batch, *a, **kw: calls.append(1) or run(batch, *a, **kw)
    with pytest.raises(ValueError, match="KV blocks") as info:
        llm.generate([GOOD, [1] * 20], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                     use_tqdm=False)
    assert "prompt 1" in str(info.value) and "num_kvcache_blocks" in str(info.value)
    assert calls == []
    assert_clean_and_working(llm, hf_greedy(hf, GOOD, 10))


# -- the engine's own arguments ---------------------------------------------------------------------


def test_model_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError, match="no-such-model"):
        LLM(str(missing))


def test_model_folder_without_config(tmp_path):
    with pytest.raises(OSError, match="config.json"):
        LLM(str(tmp_path))


def test_model_path_is_a_plain_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(OSError, match="weights.bin"):
        LLM(str(f))


def test_model_of_the_wrong_type():
    with pytest.raises(TypeError, match="model"):
        LLM(123)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 512, "n_embd": 64,
        "n_layer": 2, "n_head": 4}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        LLM(str(tmp_path))
    assert "LlamaForCausalLM" in str(info.value)  # and it says what is supported


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(num_kvcache_blocks=0), ValueError, ["num_kvcache_blocks"]),
    (dict(num_kvcache_blocks=-5), ValueError, ["num_kvcache_blocks"]),
    (dict(max_num_seqs=0), ValueError, ["max_num_seqs"]),
    (dict(max_num_seqs="4"), TypeError, ["max_num_seqs"]),
    (dict(max_num_batched_tokens=0), ValueError, ["max_num_batched_tokens"]),
    (dict(max_model_len=0), ValueError, ["max_model_len"]),
    (dict(kvcache_block_size=12), ValueError, ["kvcache_block_size", "12"]),
    (dict(kvcache_block_size=0), ValueError, ["kvcache_block_size"]),
    (dict(gpu_memory_utilization=1.5), ValueError, ["gpu_memory_utilization"]),
    (dict(tensor_parallel_size=0), ValueError, ["tensor_parallel_size"]),
    (dict(attention_backend="magic"), ValueError, ["attention_backend", "magic"]),
    (dict(device="tpu"), ValueError, ["tpu"]),
    (dict(device="not a device"), ValueError, ["not a device"]),
    (dict(dtype="int8"), ValueError, ["int8"]),
], ids=lambda v: repr(v)[:40] if not isinstance(v, type) else v.__name__)
def test_bad_engine_arguments(tiny_qwen3, kwargs, exc, words):
    path, _ = tiny_qwen3
    with pytest.raises(exc) as info:
        LLM(str(path), **kwargs)
    for w in words:
        assert w in str(info.value), f"{info.value!r} does not mention {w!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu(tiny_qwen3, device):
    path, _ = tiny_qwen3
    with pytest.raises(ValueError, match="CUDA|GPU"):
        LLM(str(path), device=device)


# -- failures inside a step -------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["RuntimeError", "Ctrl-C"])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_exception_inside_a_step_leaves_the_engine_usable(engine, monkeypatch, error, fail_at):
    llm, calls, expected = engine
    run = llm.runner.run
    seen = []

    def flaky(batch, *a, **kw):
        seen.append(1)
        if len(seen) == fail_at:  # raise once, after earlier steps have taken KV blocks
            raise error
        return run(batch, *a, **kw)

    monkeypatch.setattr(llm.runner, "run", flaky)
    prompts = [GOOD, list(range(1, 30)), list(range(40, 60))]
    with pytest.raises(type(error)):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert len(seen) == fail_at
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.scheduler.has_unfinished()
    # the same engine, with the flaky runner still in place (it raises only once), works again
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert outs[0].token_ids == expected
    assert bm.num_free_blocks == bm.num_blocks
    monkeypatch.undo()
    assert_clean_and_working(llm, expected)
