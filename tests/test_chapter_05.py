"""Chapter 05 (scheduler): MyScheduler makes nanovllm's Scheduler's decisions, in dry runs and in the real
engine, and the chapter's driver records what happened."""

from __future__ import annotations

import random

import pytest
from conftest import attempted
from nbimport import load_chapter


@pytest.fixture(scope="module")
def ch05():
    return load_chapter("05_scheduler")


def _random_case(rng):
    args = dict(max_num_seqs=rng.randint(1, 5), max_num_batched_tokens=rng.choice([4, 8, 32, 64, 4096]),
                num_blocks=rng.randint(6, 30), block_size=rng.choice([2, 4, 16]))
    room = args["num_blocks"] * args["block_size"]
    outputs = [rng.randint(1, min(25, room - 1)) for _ in range(rng.randint(1, 9))]
    return [(rng.randint(1, max(1, min(100, room - m))), m) for m in outputs], args


def test_dry_runs_match_package(ch05):
    from nanovllm.engine.scheduler import Scheduler

    rng = random.Random(1234)
    preemptions = 0
    for _ in range(300):
        requests, args = _random_case(rng)
        ours = ch05.dry_run(ch05.MyScheduler, requests, **args)
        assert ours == ch05.dry_run(Scheduler, requests, **args), (requests, args)
        preemptions += ours[1]
    assert preemptions > 0  # the cases do exercise preemption


def test_toy_example_of_the_chapter(ch05):
    steps, preemptions = ch05.dry_run(ch05.MyScheduler, [(30, 6), (70, 4), (20, 5)], max_num_seqs=2,
                                      max_num_batched_tokens=64, num_blocks=7)
    assert steps[0] == ("prefill", [(0, 30), (1, 34)])  # request 1's prompt is chunked
    assert preemptions == 1
    assert ("prefill", [(1, 9), (2, 20)]) in steps  # recomputed from the prefix cache


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from conftest import make_tiny_model

    from nanovllm import LLM

    path = tmp_path_factory.mktemp("tiny-llama-ch05")
    make_tiny_model("llama", path)
    return LLM(str(path), num_kvcache_blocks=64, max_num_seqs=4, dtype="float32", device="cpu")


def test_my_scheduler_in_the_engine(ch05, tiny_llm):
    from nanovllm import SamplingParams
    from nanovllm.engine.scheduler import Scheduler

    rng = random.Random(5)
    prompts = [[rng.randint(0, 500) for _ in range(rng.randint(3, 40))] for _ in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(2, 20), ignore_eos=True) for _ in prompts]
    tight = dict(max_num_seqs=3, max_num_batched_tokens=16, num_blocks=6)
    tiny_llm.overlapped = object()  # stands for a GPU engine's overlapped loop, tied to the old scheduler
    ch05.configure(tiny_llm, ch05.MyScheduler, **tight)
    assert tiny_llm.overlapped is None and isinstance(tiny_llm.scheduler, ch05.MyScheduler)
    assert tiny_llm.scheduler.block_manager is tiny_llm.block_manager and tiny_llm.block_manager.num_blocks == 6
    my_tokens, my_steps = ch05.drive(tiny_llm, prompts, params)
    my_preemptions = tiny_llm.scheduler.num_preemptions
    ch05.configure(tiny_llm, Scheduler, **tight)
    tokens, steps = ch05.drive(tiny_llm, prompts, params)
    shape = lambda st: [(s["kind"], s["work"], s["preempted"]) for s in st]
    assert shape(my_steps) == shape(steps) and my_tokens == tokens
    assert my_preemptions == tiny_llm.scheduler.num_preemptions > 0
    assert sum(len(s["preempted"]) for s in steps) == my_preemptions
    assert all(sum(n for _, n in s["work"]) <= 16 for s in steps)  # chunked to the budget
    # the tokens do not depend on the schedule
    ch05.configure(tiny_llm, Scheduler, max_num_seqs=8, max_num_batched_tokens=4096, num_blocks=64)
    roomy = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in roomy] == tokens
    assert [len(t) for t in tokens] == [p.max_tokens for p in params]


# -- the capstone: the book's pieces (chapter 03's attention, chapter 04's allocator, MyScheduler) as an engine ------
def test_capstone_mini_engine_gives_the_package_tokens(ch05, tiny_llm):
    from nanovllm import SamplingParams
    from nanovllm.engine.scheduler import Scheduler

    rng = random.Random(11)
    shared = [rng.randint(0, 500) for _ in range(20)]  # a prefix of more than one block: found in the cache
    prompts = [shared + [rng.randint(0, 500) for _ in range(rng.randint(1, 30))] for _ in range(7)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(10, 40)) for _ in prompts]
    knobs = dict(max_num_seqs=3, max_num_batched_tokens=16, num_blocks=8)  # chunked, tight enough to preempt
    tokens, scheduler = ch05.mini_generate(tiny_llm, prompts, params, **knobs)
    assert scheduler.num_preemptions > 0 and scheduler.block_manager.alloc.hit_tokens > 0
    ch05.configure(tiny_llm, Scheduler, **knobs)
    outs = tiny_llm.generate(prompts, params, use_tqdm=False)
    assert tokens == [o.token_ids for o in outs]


# -- exercise 1, a build: StaticScheduler in the engine, the reader's (--lab notebook) and the solution's -----------
def check_static(ch, cls, llm):
    """Static batching in the engine: groups of max_num_seqs requests in arrival order, each group one prefill
    step then decode steps until its longest request is done; the same tokens as continuous batching."""
    from nanovllm import SamplingParams
    from nanovllm.engine.scheduler import Scheduler

    rng = random.Random(3)
    prompts = [[rng.randint(0, 500) for _ in range(rng.randint(3, 30))] for _ in range(7)]
    max_tokens = [3, 8, 2, 5, 7, 1, 4]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    ch.configure(llm, cls, max_num_seqs=3, max_num_batched_tokens=4096, num_blocks=64)
    tokens, steps = ch.drive(llm, prompts, params)
    expected = []
    for g in range(0, len(prompts), 3):
        group = list(range(g, min(g + 3, len(prompts))))
        expected.append(("prefill", group))
        for t in range(1, max(max_tokens[g:g + 3])):
            expected.append(("decode", sorted(r for r in group if t < max_tokens[r])))
    got = [(s["kind"], sorted(r for r, _ in s["work"])) for s in steps]
    assert got == expected, f"steps (kind, requests): {got}"
    ch.configure(llm, Scheduler, max_num_seqs=3, max_num_batched_tokens=4096, num_blocks=64)
    assert tokens == ch.drive(llm, prompts, params)[0]  # the schedule does not change the tokens


def test_static_scheduler_in_the_engine(lab_code, tiny_llm):
    ch = load_chapter("05_scheduler", code=lab_code)
    with attempted(lab_code):
        check_static(ch, ch.StaticScheduler, tiny_llm)


def test_continuous_batching_fails_the_static_checks(ch05, tiny_llm):
    with pytest.raises(AssertionError, match="steps"):
        check_static(ch05, ch05.MyScheduler, tiny_llm)


# -- the chapter's figures: each script runs and draws its PNG (in a copy of figures/, so the committed PNG stays) --
@pytest.mark.parametrize("name", ["fig_05_batching"])
def test_figure_script_runs(name, tmp_path):
    from conftest import run_figure_script

    run_figure_script(name, tmp_path)
