"""One engine, several callers: generate() from many threads gives each caller its own correct tokens; a call
from inside a running step is refused with a clear error and the outer call still completes."""

from __future__ import annotations

import threading

import pytest

from nanovllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    return LLM(tiny_qwen3[0], device="cpu", num_kvcache_blocks=128, max_model_len=256)


def test_generate_from_several_threads_at_once(engine):
    prompts = [[list(range(5 + i, 25 + i)), list(range(100 + i, 107 + i))] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [[o.token_ids for o in engine.generate(p, params, use_tqdm=False)] for p in prompts]
    got, errors = [None] * len(prompts), []
    start = threading.Barrier(len(prompts))

    def caller(i):
        try:
            start.wait()
            outs = engine.generate(prompts[i], params, use_tqdm=False)
            got[i] = [o.token_ids for o in outs]
            assert all(o.finish_reason == "length" for o in outs)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == want
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_reentrant_generate_is_refused_and_the_outer_call_completes(engine, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = engine.generate([[1, 2, 3, 4]], params, use_tqdm=False)[0].token_ids
    run, refused = engine.runner.run, []

    def run_and_reenter(batch, *args):
        try:
            engine.generate([[9, 9]], params, use_tqdm=False)
        except RuntimeError as e:
            refused.append(str(e))
        return run(batch, *args)

    monkeypatch.setattr(engine.runner, "run", run_and_reenter)
    out = engine.generate([[1, 2, 3, 4]], params, use_tqdm=False)[0]
    assert refused and "re-entrant" in refused[0] and "generate()" in refused[0]
    assert out.token_ids == want and out.finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_step_on_an_idle_engine_returns_nothing(engine):
    assert not engine.has_unfinished_requests()
    assert engine.step() == (None, [])
