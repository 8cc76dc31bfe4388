"""Chapter 10's build exercise, ``latency_stats``: the reader's function (or the solution's, ``--lab solutions``)
turns the token timings of an engine driven step by step (the chapter's ``record_timings``) into TTFT and ITL
statistics, and must give what ``nanovllm.bench`` reports for the same timings; on timings made up by hand it
must give the numbers worked out by hand."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import attempted
from nbimport import load_chapter

from nanovllm import LLM, bench

CHAPTER = "10_benchmark"
KEYS = ("ttft_ms_median", "ttft_ms_p99", "itl_ms_median", "itl_ms_p99")
# two requests started at 0: tokens at 0.1, 0.3, 0.6 s and at 0.2, 0.25 s -> TTFT 100, 200 ms; ITL 200, 300, 50 ms
BY_HAND = ([(0.0, [0.1, 0.3, 0.6]), (0.0, [0.2, 0.25])],
           {"ttft_ms_median": 150.0, "ttft_ms_p99": 200.0, "itl_ms_median": 200.0, "itl_ms_p99": 300.0})


@pytest.fixture(scope="module")
def engine_timings(tiny_qwen3):
    """Token timings of eight requests of different lengths, recorded by the chapter's record_timings."""
    path, _ = tiny_qwen3
    ch = load_chapter(CHAPTER)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 50, 9, 120, 17, 5, 64, 30)]
    with LLM(path, device="cpu", dtype="float32", max_num_seqs=8, max_model_len=256,
             max_num_batched_tokens=64) as llm:  # 64: the long prompts' prefill comes in chunks
        ch.record_timings(llm, prompts[:1], 2)  # warm-up
        timings = ch.record_timings(llm, prompts, 12)
    assert [len(ts) for _, ts in timings] == [12] * 8
    return timings


def check_stats(fn, timings):
    """The exercise's contract: nanovllm.bench's numbers for the engine's timings, and the hand-made case."""
    want = bench.latency_result("nanovllm", timings, "cpu", "")
    got = fn(timings)
    for key in KEYS:
        assert math.isclose(got[key], getattr(want, key), rel_tol=1e-9), (key, got[key], getattr(want, key))
    got = fn(BY_HAND[0])
    for key in KEYS:
        assert math.isclose(got[key], BY_HAND[1][key], rel_tol=1e-9), (key, got[key], BY_HAND[1][key])


def test_latency_stats_give_the_benchmarks_numbers(lab_code, engine_timings):
    ch = load_chapter(CHAPTER, code=lab_code)
    with attempted(lab_code):
        check_stats(ch.latency_stats, engine_timings)


def test_wrong_latency_stats_fail_the_checks(engine_timings):
    ch = load_chapter(CHAPTER, code="solutions")

    def interpolated_p99(timings):  # statistics.quantiles interpolates between samples: not a measured value
        stats = ch.latency_stats(timings)
        ttft = [(ts[0] - s) * 1e3 for s, ts in timings]
        itl = [(b - a) * 1e3 for _, ts in timings for a, b in zip(ts, ts[1:])]
        return {**stats, "ttft_ms_p99": statistics.quantiles(ttft, n=100)[98],
                "itl_ms_p99": statistics.quantiles(itl, n=100)[98]}

    def itl_from_the_start(timings):  # the first gap measured from the request's start: TTFT counted as an ITL
        return ch.latency_stats([(s, [s, *ts]) for s, ts in timings]) | {
            k: v for k, v in ch.latency_stats(timings).items() if k.startswith("ttft")}

    for wrong in (interpolated_p99, itl_from_the_start):
        with pytest.raises(AssertionError):
            check_stats(wrong, engine_timings)
