"""The scheduler on hand-made scenarios (no model: the tests play the runner and make up the sampled tokens).

Each expected schedule below is worked out from the policy in the scheduler's docstring (FCFS admission,
prefill before decode, chunks within max_num_batched_tokens, preempt the newest when a decode step runs out
of blocks), not copied from a run.
"""

from __future__ import annotations

import pytest

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, caching=True, eos=(), **cfg):
    config = EngineConfig(kvcache_block_size=block_size, num_kvcache_blocks=num_blocks,
                          enable_prefix_caching=caching, eos_token_ids=tuple(eos), **cfg)
    bm = BlockManager(num_blocks, block_size, caching)
    return Scheduler(config, bm), bm


def seq(seq_id, tokens, **params):
    return Sequence(seq_id, list(tokens), SamplingParams(**params))


def run_step(sched, token=1, tokens=None):
    """Schedule one step, 'run' it, feed ``token`` (or the per-sequence ``tokens``) to those that sample."""
    batch = sched.schedule()
    plan = [(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
    samplers = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
    toks = [tokens[s.seq_id] if tokens else token for s in samplers]
    finished = sched.postprocess(batch, toks)
    return batch, plan, finished


def drain(sched, token=1, max_steps=1000):
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return
        run_step(sched, token)
    raise AssertionError("did not finish")


# -- chunked prefill --------------------------------------------------------------------------------


def test_chunked_prefill_of_several_sequences():
    sched, bm = make(max_num_batched_tokens=10)
    a, b, c = seq(0, range(7), max_tokens=3), seq(1, range(10, 16), max_tokens=3), seq(2, range(20, 25), max_tokens=3)
    for s in (a, b, c):
        sched.add(s)
    batch, plan, _ = run_step(sched)
    assert batch.is_prefill and plan == [(0, 7), (1, 3)]  # a whole, b's first chunk fills the budget
    assert len(a) == 8 and len(b) == 6  # a sampled, b did not
    assert c.status == SequenceStatus.WAITING  # no budget left for it
    batch, plan, _ = run_step(sched)
    assert batch.is_prefill and plan == [(1, 3), (2, 5)]  # b's rest first, then c; a waits to decode
    batch, plan, _ = run_step(sched)
    assert not batch.is_prefill and sorted(plan) == [(0, 1), (1, 1), (2, 1)]  # (in any order)
    drain(sched)
    assert [s.num_completion_tokens for s in (a, b, c)] == [3, 3, 3]
    assert bm.num_free_blocks == bm.num_blocks


def test_long_prompt_is_chunked_to_the_budget():
    sched, bm = make(max_num_batched_tokens=8)
    a = seq(0, range(30), max_tokens=2)
    sched.add(a)
    chunks = []
    while a.num_completion_tokens == 0:
        batch, plan, _ = run_step(sched)
        assert batch.is_prefill
        chunks.append(plan[0][1])
    assert chunks == [8, 8, 8, 6]


def test_max_num_seqs_limits_admission():
    sched, _ = make(max_num_seqs=2)
    seqs = [seq(i, range(10 * i, 10 * i + 3), max_tokens=4) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch, plan, _ = run_step(sched)
    assert [p[0] for p in plan] == [0, 1] and len(sched.running) == 2 and len(sched.waiting) == 2
    batch, _, finished = run_step(sched)
    assert not batch.is_prefill and len(batch.seqs) == 2


def test_decode_batch_respects_max_num_batched_tokens():
    sched, _ = make(max_num_batched_tokens=2, max_num_seqs=8)
    seqs = [seq(i, [i], max_tokens=5) for i in range(4)]
    for s in seqs:
        sched.add(s)
    for _ in range(30):
        if not sched.has_unfinished():
            break
        batch, plan, _ = run_step(sched)
        assert sum(batch.num_new_tokens) <= 2
    assert not sched.has_unfinished()


# -- preemption -------------------------------------------------------------------------------------


def test_decode_preempts_the_newest_sequence_when_blocks_run_out():
    sched, bm = make(num_blocks=3, block_size=4, caching=False)
    a, b = seq(0, range(4), max_tokens=10), seq(1, range(10, 14), max_tokens=10)
    c = seq(2, range(20, 24), max_tokens=10)
    for s in (a, b, c):
        sched.add(s)
    batch, plan, _ = run_step(sched)
    # a and b fit (one block each); c needs a block too and gets the third
    assert plan == [(0, 4), (1, 4), (2, 4)] and bm.num_free_blocks == 0
    b_blocks = list(b.block_table)
    c_blocks = list(c.block_table)
    # decode: a needs a 2nd block, none is free -> the newest (c) is preempted; then b needs one -> ...
    batch, plan, _ = run_step(sched)
    assert sched.num_preemptions == 2
    assert plan == [(0, 1)]  # only a runs
    assert list(sched.waiting) == [b, c]  # back at the front, oldest first
    for s in (b, c):
        assert s.status == SequenceStatus.WAITING and s.block_table == [] and s.num_computed_tokens == 0
        assert len(s) == 5  # the sampled token is kept: it is recomputed, not resampled
    assert all(bm.blocks[x].ref_count == 0 for x in b_blocks + c_blocks if x not in a.block_table)
    assert len(a.block_table) == 2


def test_preempted_sequence_goes_before_other_waiting_ones():
    sched, bm = make(num_blocks=2, block_size=4, caching=False, max_num_seqs=2)
    a, b = seq(0, range(4), max_tokens=4), seq(1, range(10, 14), max_tokens=4)  # 8 tokens: 2 blocks
    late = seq(2, range(20, 22), max_tokens=1)
    for s in (a, b, late):
        sched.add(s)
    run_step(sched)  # a, b admitted (max_num_seqs=2), late waits
    run_step(sched)  # decode: a needs a block -> b preempted
    assert list(sched.waiting) == [b, late]
    drain(sched)
    assert [s.num_completion_tokens for s in (a, b, late)] == [4, 4, 1]
    assert bm.num_free_blocks == 2


def test_preempted_sequence_recomputes_and_reuses_its_cached_blocks():
    sched, bm = make(num_blocks=5, block_size=4, caching=True)
    a, b = seq(0, range(8), max_tokens=8), seq(1, range(10, 18), max_tokens=8)
    for s in (a, b):
        sched.add(s)
    run_step(sched)  # both prefilled: 2 blocks each, 1 free
    run_step(sched)  # decode: a takes the free block; b takes ... none left -> preempted
    assert sched.num_preemptions == 1 and sched.waiting[0] is b
    # when b comes back, its first full blocks are prefix-cache hits unless they were reclaimed meanwhile
    drain(sched)
    assert b.num_completion_tokens == 8 and bm.num_free_blocks == 5


def test_num_cached_tokens_counts_only_the_first_admission():
    """A request preempted before its first token must not report its own recomputed blocks as cache hits."""
    sched, bm = make(num_blocks=3, block_size=4, caching=True, max_num_batched_tokens=8)
    a = seq(0, range(4), max_tokens=2)
    b = seq(1, range(10, 15), max_tokens=1)
    for s in (a, b):
        sched.add(s)
    _, plan, _ = run_step(sched)
    assert plan == [(0, 4), (1, 4)]  # b: 4 of 5 prompt tokens, its first block computed and cached
    _, plan, _ = run_step(sched)  # decode: a needs a block -> b preempted before sampling anything
    assert sched.num_preemptions == 1 and b.num_completion_tokens == 0
    drain(sched)
    assert b.finish_reason == "length"
    assert b.num_cached_tokens == 0  # nothing was in the cache when it first came
    assert a.num_cached_tokens == 0


# -- prefix caching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("caching", [True, False])
def test_second_request_with_the_same_prompt_computes_fewer_tokens(caching):
    sched, bm = make(block_size=16, caching=caching)
    prompt = list(range(100, 140))  # 40 tokens: 2 full blocks + 8
    first = seq(0, prompt, max_tokens=2)
    sched.add(first)
    _, plan, _ = run_step(sched)
    assert plan == [(0, 40)]
    drain(sched)
    second = seq(1, prompt, max_tokens=2)
    sched.add(second)
    _, plan, _ = run_step(sched)
    if caching:
        assert plan == [(1, 8)] and second.num_cached_tokens == 32
    else:
        assert plan == [(1, 40)] and second.num_cached_tokens == 0
    drain(sched)
    assert bm.num_free_blocks == bm.num_blocks


def test_prefix_hit_while_the_owner_is_still_running():
    sched, bm = make(block_size=4, max_num_batched_tokens=12)
    a = seq(0, list(range(8)) + [50, 51], max_tokens=5)
    b = seq(1, list(range(8)) + [60], max_tokens=5)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    _, plan, _ = run_step(sched)
    assert (1, 1) in plan  # 8 of b's 9 prompt tokens were a's blocks
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == 8
    drain(sched)
    assert bm.num_free_blocks == bm.num_blocks


# -- stopping ---------------------------------------------------------------------------------------


def generate_with(sched, s, tokens):
    """Feed the given sampled tokens one by one until ``s`` finishes; returns its completion."""
    sched.add(s)
    it = iter(tokens)
    while not s.is_finished:
        run_step(sched, token=next(it))
    return s.completion_token_ids


def test_stop_on_eos():
    sched, bm = make(eos=(7,))
    s = seq(0, [1, 2, 3], max_tokens=10)
    assert generate_with(sched, s, [4, 5, 7, 8, 9]) == [4, 5, 7]
    assert s.finish_reason == "stop" and bm.num_free_blocks == bm.num_blocks


def test_multiple_eos_ids():
    sched, _ = make(eos=(7, 9))
    s = seq(0, [1, 2, 3], max_tokens=10)
    assert generate_with(sched, s, [4, 9, 7]) == [4, 9]
    assert s.finish_reason == "stop"


def test_stop_token_ids():
    sched, _ = make(eos=(7,))
    s = seq(0, [1, 2, 3], max_tokens=10, stop_token_ids=[5, 6])
    assert generate_with(sched, s, [4, 6, 7]) == [4, 6]  # the stop token is kept in the output
    assert s.finish_reason == "stop"


def test_ignore_eos_keeps_going_but_stop_tokens_still_stop():
    sched, _ = make(eos=(7,))
    s = seq(0, [1, 2, 3], max_tokens=4, ignore_eos=True)
    assert generate_with(sched, s, [7, 7, 7, 7, 7]) == [7, 7, 7, 7]
    assert s.finish_reason == "length"
    s2 = seq(1, [1, 2, 3], max_tokens=10, ignore_eos=True, stop_token_ids=[5])
    assert generate_with(sched, s2, [7, 5, 7]) == [7, 5]
    assert s2.finish_reason == "stop"


def test_max_tokens():
    sched, _ = make(eos=(7,))
    s = seq(0, [1, 2, 3], max_tokens=3)
    assert generate_with(sched, s, [4, 4, 4, 4, 4]) == [4, 4, 4]
    assert s.finish_reason == "length"
    one = seq(1, [1, 2, 3], max_tokens=1)
    assert generate_with(sched, one, [4, 4]) == [4] and one.finish_reason == "length"


def test_max_model_len():
    sched, _ = make(max_model_len=6)
    s = seq(0, [1, 2, 3, 4], max_tokens=100)
    assert generate_with(sched, s, [9] * 10) == [9, 9]
    assert len(s) == 6 and s.finish_reason == "length"


def test_eos_beats_length_on_the_last_token():
    sched, _ = make(eos=(7,))
    s = seq(0, [1, 2, 3], max_tokens=2)
    assert generate_with(sched, s, [4, 7]) == [4, 7]
    assert s.finish_reason == "stop"


def test_postprocess_returns_finished_sequences_and_frees_their_blocks():
    sched, bm = make()
    short, long_ = seq(0, [1, 2], max_tokens=1), seq(1, [3, 4], max_tokens=3)
    sched.add(short), sched.add(long_)
    _, _, finished = run_step(sched)
    assert finished == [short] and short.is_finished and short.block_table == []
    assert sched.running == [long_]
    drain(sched)
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_all_releases_everything():
    sched, bm = make(max_num_batched_tokens=4)
    seqs = [seq(i, range(10 * i, 10 * i + 6), max_tokens=5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    assert bm.num_free_blocks < bm.num_blocks
    sched.abort_all()
    assert not sched.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    assert all(s.block_table == [] for s in seqs)
