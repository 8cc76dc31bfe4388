"""AsyncLLM: one engine loop, requests from threads and asyncio tasks, streamed deltas that add up to what
``LLM.generate`` returns, abort that frees blocks at once, failures that leave the loop serving."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import hf_greedy
from test_overlap import overlapped

from nanovllm import LLM, SamplingParams
from nanovllm.async_llm import AsyncLLM, Delta

GREEDY = SamplingParams(temperature=0, max_tokens=12)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?",
             "Name three planets.", "What is 2 + 2?", "Tell me a joke about cats."]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(device="cpu", dtype="float32", max_num_seqs=16, max_model_len=512)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def expected(llm):
    return {q: llm.generate([q], GREEDY, use_tqdm=False)[0] for q in QUESTIONS}


@pytest.fixture
def engine(llm):
    a = AsyncLLM(llm=llm)
    yield a
    a.stop()  # the loop ends; the module's LLM stays
    assert not a.running and not a._thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        a.add_request(QUESTIONS[0], GREEDY)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks, "blocks left allocated"


def collect(stream) -> tuple[str, list[int], list[Delta]]:
    deltas = list(stream)
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


def test_a_stream_adds_up_to_generate(engine, expected):
    q = QUESTIONS[0]
    text, tokens, deltas = collect(engine.add_request(q, GREEDY))
    want = expected[q]
    assert tokens == want.token_ids and text == want.text
    assert len(deltas) == len(tokens), "one delta per token (the plain loop)"
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == want.finish_reason


def test_threads_at_once(engine, expected):
    results, errors = {}, []

    def client(i):
        q = QUESTIONS[i % len(QUESTIONS)]
        try:
            stream = engine.add_request(q, GREEDY)
            results[i] = (q, collect(stream), stream.output)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 12
    for q, (text, tokens, _), output in results.values():
        assert tokens == expected[q].token_ids and text == expected[q].text
        assert output.token_ids == tokens and output.text == text


def test_asyncio_tasks_at_once(engine, expected):
    async def one(i):
        q = QUESTIONS[i % len(QUESTIONS)]
        pieces = [d async for d in engine.generate(q, GREEDY)]
        return q, "".join(d.text for d in pieces), [t for d in pieces for t in d.token_ids]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(32)))

    for q, text, tokens in asyncio.run(main()):
        assert tokens == expected[q].token_ids and text == expected[q].text
    assert engine.metrics.ttft.count >= 32 and engine.metrics.itl.count > 0


def test_abort_frees_blocks_at_once(engine, llm):
    stream = engine.add_request("Tell me a long story.", SamplingParams(temperature=0, max_tokens=400,
                                                                     ignore_eos=True))
    it = iter(stream)
    first = next(it)
    assert first.token_ids and llm.block_manager.num_free_blocks < llm.block_manager.num_blocks
    stream.abort()
    rest = list(it)
    assert rest and rest[-1].finish_reason == "abort"
    assert stream.output.finish_reason == "abort" and len(stream.output.token_ids) < 400
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_consumer_that_goes_away_aborts_its_request(engine, llm):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        agen = engine.generate("Count to a thousand.", params, request_id="leaver")
        async for _ in agen:
            break  # the client disconnected
        await agen.aclose()
        for _ in range(200):  # the loop aborts it before its next step
            if "leaver" not in engine._pending_ids:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the abandoned request was not aborted")

    asyncio.run(main())
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_bad_requests_are_refused_in_the_caller(engine, expected):
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(TypeError):
        engine.add_request("hi", sampling_params="greedy")
    engine.add_request(QUESTIONS[1], GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(QUESTIONS[1], GREEDY, request_id="dup")
    text, tokens, _ = collect(engine.add_request(QUESTIONS[1], GREEDY))
    assert tokens == expected[QUESTIONS[1]].token_ids


def test_a_failed_step_ends_the_requests_and_the_loop_goes_on(engine, llm, expected):
    real = llm.runner.run
    calls = []

    def broken(batch, *a, **kw):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected failure")
        return real(batch, *a, **kw)

    llm.runner.run = broken
    try:
        stream = engine.add_request(QUESTIONS[2], GREEDY)
        with pytest.raises(RuntimeError, match="injected failure"):
            list(stream)
    finally:
        llm.runner.run = real
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    text, tokens, _ = collect(engine.add_request(QUESTIONS[2], GREEDY))
    assert tokens == expected[QUESTIONS[2]].token_ids


def test_llm_generate_still_works_beside_the_loop(engine, llm, expected):
    stream = engine.add_request(QUESTIONS[3], GREEDY)
    direct = llm.generate([QUESTIONS[4]], GREEDY, use_tqdm=False)[0]
    assert direct.token_ids == expected[QUESTIONS[4]].token_ids
    assert collect(stream)[1] == expected[QUESTIONS[3]].token_ids


def test_shutdown_with_requests_in_flight(tiny_qwen3):
    path, _ = tiny_qwen3
    engine = AsyncLLM(path, device="cpu", dtype="float32")
    streams = [engine.add_request([1, 2, 3 + i], SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
               for i in range(4)]
    next(iter(streams[0]))
    engine.shutdown()
    assert not engine._thread.is_alive()
    for s in streams:
        deltas = list(s)  # every stream ends (no hang), the last delta says why
        assert s.finished and s.output.finish_reason == "abort"
        assert not deltas or deltas[-1].finish_reason == "abort"
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request([1, 2, 3], GREEDY)


def test_the_overlapped_loop_streams_the_same_tokens(tiny_qwen3):
    path, hf = tiny_qwen3
    llm = overlapped(LLM(path, device="cpu", num_kvcache_blocks=64, max_model_len=200))
    with AsyncLLM(llm=llm) as engine:
        prompts = [list(range(3, 3 + n)) for n in (5, 17, 9)]
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        streams = [engine.add_request(p, params) for p in prompts]
        for p, s in zip(prompts, streams):
            assert collect(s)[1] == hf_greedy(hf, p, 10)
        assert llm.overlapped.launches > 3, "the overlapped path was not taken"
        long = engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
        it = iter(long)
        next(it), next(it)
        long.abort()
        assert list(it)[-1].finish_reason == "abort"
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_n_stop_strings_and_logprobs_stream_as_generate_returns_them(engine, llm, expected):
    q = QUESTIONS[1]
    words = expected[q].text.split()
    assert len(words) >= 4
    stop = " " + words[len(words) // 2]  # a stop string the greedy reply reaches midway
    cases = [SamplingParams(temperature=0.9, seed=11, n=3, max_tokens=10),
             SamplingParams(temperature=0, max_tokens=12, stop=[stop]),
             SamplingParams(temperature=0, max_tokens=6, logprobs=2)]
    for params in cases:
        want = llm.generate([q], params, use_tqdm=False)[0]
        stream = engine.add_request(q, params)
        deltas = list(stream)
        for out in want.outputs:
            mine = [d for d in deltas if d.index == out.index]
            assert "".join(d.text for d in mine) == out.text, params
            assert [t for d in mine for t in d.token_ids] == out.token_ids
            assert mine[-1].finish_reason == out.finish_reason
            if params.logprobs is not None:
                assert [lp for d in mine for lp in d.logprobs] == out.logprobs
        assert [o.text for o in stream.output.outputs] == [o.text for o in want.outputs]
        if params.stop:
            assert want.finish_reason == "stop" and want.stop_reason == stop and stop not in want.text
            assert all(stop.strip() not in d.text for d in deltas), "a piece of the stop string was streamed"
    assert len({o.text for o in want.outputs}) >= 1


def test_text_shorter_than_the_held_back_length_is_not_sent(engine, llm):
    """A stop string longer than the text so far: nothing may be sent yet (a negative slice bound once sent a
    prefix holding the stop string's start, and the streamed text then differed from generate()'s)."""
    prompt = "The capital of France is"
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].text
    assert len(full) > 6
    stop = full[2:] + "\n\nThe"  # starts early in the text, longer than the text for several tokens
    params = SamplingParams(temperature=0, max_tokens=12, stop=[stop[:8]])
    want = llm.generate([prompt], params, use_tqdm=False)[0]
    deltas = list(engine.add_request(prompt, params))
    assert "".join(d.text for d in deltas) == want.text


def test_a_dropped_async_llm_frees_its_engine(tiny_qwen3):
    """No shutdown(): dropping the last reference ends the loop and frees the engine (as dropping an LLM does)."""
    import gc
    import weakref

    path, _ = tiny_qwen3
    engine = AsyncLLM(path, device="cpu", dtype="float32")
    assert len(list(engine.add_request([1, 2, 3], GREEDY))) == 12
    llm_ref, thread = weakref.ref(engine.llm), engine._thread
    del engine
    thread.join(10)
    gc.collect()
    assert not thread.is_alive(), "the loop outlived its AsyncLLM"
    assert llm_ref() is None, "the engine is still alive"
