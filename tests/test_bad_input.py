"""Bad input fails fast and clearly: a ValueError / TypeError (OSError for files) whose message names the
problem, raised before any model step runs; afterwards the same engine still generates correctly with every
KV block free.  Also: an exception inside a step leaves the engine clean and usable."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import hf_greedy, make_tiny_model

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
    ([list(np.array([5, 600]))], ValueError, ["600", "vocab"]),  # numpy ints are checked like ints
    ([[np.float32(1.0)]], TypeError, ["int", "float32"]),
    ([[np.bool_(True)]], TypeError, ["int", "bool"]),
], ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__)
def test_bad_prompts(engine, prompts, exc, words):
    rejects(engine, prompts, GREEDY, exc, *words)


def test_numpy_integer_token_ids_are_taken(engine):
    """Token ids straight from numpy (an array's elements, any integer type) are ids like any other."""
    llm, _, expected = engine
    [out] = llm.generate([list(np.array(GOOD, dtype=np.int64))], GREEDY, use_tqdm=False)
    assert out.token_ids == expected and out.prompt_token_ids == GOOD
    assert all(type(t) is int for t in out.prompt_token_ids)
    seq = llm.add_request(list(np.array(GOOD, dtype=np.int32)), GREEDY)
    while llm.step()[0] is not None:
        pass
    assert llm.output(seq).token_ids == expected
    assert_clean_and_working(llm, expected)


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
    (dict(top_k=2 ** 63), ValueError, ["top_k", str(2 ** 63)]),  # the sampler's int64 cannot hold it
    (dict(temperature=math.inf), ValueError, ["temperature", "inf"]),
    (dict(stop_token_ids=5), TypeError, ["stop_token_ids", "int"]),
    (dict(ignore_eos="no"), TypeError, ["ignore_eos", "str"]),  # not taken as True
])
def test_bad_sampling_params_fail_when_made(engine, kwargs, exc, words):
    with pytest.raises(exc) as info:
        SamplingParams(**kwargs)
    for w in words:
        assert w in str(info.value)
    _, _, expected = engine
    assert_clean_and_working(engine[0], expected)


def test_what_sampling_params_accept_runs(engine):
    """The extremes validation lets through run to the end: the largest top_k, a huge temperature."""
    llm, _, expected = engine
    for params in (SamplingParams(top_k=2 ** 63 - 1, seed=1, max_tokens=3),
                   SamplingParams(temperature=1e300, top_k=5, seed=2, max_tokens=3)):
        [out] = llm.generate([GOOD], params, use_tqdm=False)
        assert len(out.token_ids) == 3
    assert_clean_and_working(llm, expected)


def test_stop_token_ids_from_a_generator_stop_the_request(engine):
    llm, _, expected = engine
    stop = expected[3]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=(t for t in [stop]))
    [out] = llm.generate([GOOD], params, use_tqdm=False)
    assert out.token_ids == expected[:expected.index(stop) + 1] and out.finish_reason == "stop"
    assert_clean_and_working(llm, expected)


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


# -- text and chat ----------------------------------------------------------------------------------

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    """A tiny random-weight Llama with a real tokenizer and chat template (the embedded SmolLM2's)."""
    from nanovllm.loading.embedded import embedded_model_dir

    src = embedded_model_dir(progress=False)
    path = tmp_path_factory.mktemp("tiny-chat")
    make_tiny_model("llama", path, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, path / name)
    llm = LLM(str(path), max_model_len=128, num_kvcache_blocks=32)
    calls = []
    run = llm.runner.run
    llm.runner.run = lambda batch, *a, **kw: calls.append(1) or run(batch, *a, **kw)
    [out] = llm.chat(HELLO, GREEDY, use_tqdm=False)
    return llm, calls, out.token_ids


def chat_still_works(llm, expected):
    bm = llm.block_manager
    assert not llm.scheduler.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    [out] = llm.chat(HELLO, GREEDY, use_tqdm=False)
    assert out.token_ids == expected and bm.num_free_blocks == bm.num_blocks


PART = {"type": "text", "text": "Hello"}


@pytest.mark.parametrize("messages, exc, words", [
    ([{"role": "user"}], ValueError, ["message 0", "'content'"]),
    ([{"content": "hi"}], ValueError, ["message 0", "'role'"]),
    ([{"role": "user", "content": 5}], TypeError, ["message 0", "content", "int"]),
    ([{"role": "user", "content": None}], TypeError, ["content", "NoneType"]),
    ([{"role": 5, "content": "hi"}], TypeError, ["role", "int"]),
    ([{"role": "user", "content": [5]}], TypeError, ["part 0", "int"]),
    ([{"role": "user", "content": [PART, {"type": "text"}]}], ValueError, ["part 1", "'text'"]),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], ValueError,
     ["image_url", "text"]),
    ([{"role": "user", "content": "hi"}, "oops"], TypeError, ["message 1", "str"]),
    ([HELLO, [{"role": "user"}]], ValueError, ["conversation 1", "message 0", "'content'"]),
    ([{"role": "user", "content": "a\ud800b"}], ValueError, ["message 0", "surrogate", "1"]),
    ([{"role": "user\udfff", "content": "hi"}], ValueError, ["message 0", "role", "surrogate"]),
    ([], ValueError, ["empty"]),
    ([[]], ValueError, ["conversation 0", "empty"]),
    ({"role": "user", "content": "hi"}, TypeError, ["dict"]),
    ("hello", TypeError, ["str"]),
], ids=lambda v: repr(v)[:40] if not isinstance(v, type) else v.__name__)
def test_bad_chat_messages(chat_engine, messages, exc, words):
    llm, calls, expected = chat_engine
    before = len(calls)
    with pytest.raises(exc) as info:
        llm.chat(messages, GREEDY, use_tqdm=False)
    assert len(calls) == before, "the engine ran a step before rejecting the input"
    for w in words:
        assert w in str(info.value), f"{info.value!r} does not mention {w!r}"
    chat_still_works(llm, expected)


def test_chat_content_as_text_parts(chat_engine):
    """OpenAI-style content parts, as vLLM takes them: the texts joined by newlines."""
    llm, _, expected = chat_engine
    parts = [{"role": "user", "content": [PART, {"type": "text", "text": "there"}]}]
    [a] = llm.chat(parts, GREEDY, use_tqdm=False)
    [b] = llm.chat([{"role": "user", "content": "Hello\nthere"}], GREEDY, use_tqdm=False)
    assert a.prompt_token_ids == b.prompt_token_ids and a.token_ids == b.token_ids
    chat_still_works(llm, expected)


def test_chat_template_refusal_is_a_value_error(chat_engine, monkeypatch):
    llm, calls, expected = chat_engine
    monkeypatch.setattr(llm.tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="conversation 0.*roles must alternate"):
        llm.chat(HELLO, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    chat_still_works(llm, expected)


@pytest.mark.parametrize("prompts, words", [
    ("abc\ud800", ["prompt 0", "surrogate", "3"]),
    (["fine", "\udc80x"], ["prompt 1", "surrogate", "0"]),
])
def test_lone_surrogate_in_text(chat_engine, prompts, words):
    """Text that is not valid Unicode (a lone surrogate, as from a bad decode) cannot be tokenized."""
    llm, calls, expected = chat_engine
    before = len(calls)
    with pytest.raises(ValueError) as info:
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert len(calls) == before
    for w in words:
        assert w in str(info.value), f"{info.value!r} does not mention {w!r}"
    chat_still_works(llm, expected)


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
    (dict(max_model_len=1), ValueError, ["max_model_len", "2"]),  # no prompt could run
    (dict(enable_prefix_caching="no"), TypeError, ["enable_prefix_caching", "bool", "str"]),
    (dict(enforce_eager="yes"), TypeError, ["enforce_eager", "bool", "str"]),
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


def test_triton_backend_on_a_cpu_needs_the_interpreter(tiny_qwen3):
    """Without a GPU, Triton kernels run only under its interpreter (TRITON_INTERPRET=1 before triton is
    imported, as the tests do): otherwise the engine is refused when made, not at every generate."""
    pytest.importorskip("triton")
    path, _ = tiny_qwen3
    code = ("import sys\nfrom nanovllm import LLM\n"
            "try:\n    LLM(sys.argv[1], device='cpu', attention_backend='triton')\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for w in ("ValueError", "attention_backend='triton'", "TRITON_INTERPRET=1", "'torch'"):
        assert w in out.stdout, f"{out.stdout!r} does not mention {w!r}"


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
