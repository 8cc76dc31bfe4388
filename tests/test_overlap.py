"""Overlapped steps (step N+1, prefill or decode, launched before step N's tokens reach the host) give
the same tokens as the plain loop.  On a GPU the launches replay CUDA graphs; here a stand-in loop keeps
their protocol (pending tokens, handed over from the previous launch) on top of the real CPU runner."""

import threading

import pytest
from conftest import hf_greedy

from nanovllm import LLM, SamplingParams
from nanovllm.engine.overlap import OverlappedLoop, OverlapScheduler
from nanovllm.engine.sequence import ScheduledBatch


class EmulatedLoop(OverlappedLoop):
    """The overlapped loop with its two launches computed synchronously on the CPU."""

    def __init__(self, scheduler, runner):
        super().__init__(scheduler, runner, max_batch=64)
        self.prev, self.launches, self.prefill_launches = {}, 0, 0

    def launch_prefill(self, batch):
        assert not any(s.num_pending_tokens for s in batch.seqs), "a pending token reached a prefill"
        tokens = self.runner.run(batch)
        sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        self.prev = {s.seq_id: t for s, t in zip(sampled, tokens)}
        self.prefill_launches += 1
        return tokens

    def launch_decode(self, seqs):
        pending = [s for s in seqs if s.num_pending_tokens]
        for s in pending:  # on a GPU these come straight from the previous step's output tensor
            assert s.num_pending_tokens == 1
            s.token_ids.append(self.prev[s.seq_id])
            s.num_pending_tokens -= 1
        tokens = self.runner.run(ScheduledBatch(seqs, [1] * len(seqs), is_prefill=False))
        for s in pending:
            s.token_ids.pop()
            s.num_pending_tokens += 1
        self.prev = {s.seq_id: t for s, t in zip(seqs, tokens)}
        self.launches += 1
        return tokens

    @staticmethod
    def tokens(ticket):
        return ticket


def overlapped(llm: LLM) -> LLM:
    """``llm`` with the overlapped loop that a GPU engine with CUDA graphs gets."""
    llm.scheduler = OverlapScheduler(llm.config, llm.block_manager)
    llm.overlapped = EmulatedLoop(llm.scheduler, llm.runner)
    return llm


@pytest.fixture
def llm_and_hf(tiny_qwen3):
    path, hf = tiny_qwen3
    return overlapped(LLM(path, device="cpu", num_kvcache_blocks=64, max_model_len=200)), hf


def test_overlapped_decode_matches_hf(llm_and_hf):
    llm, hf = llm_and_hf
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 33, 2)]
    max_tokens = [12, 3, 20, 1]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.overlapped.launches > 5, "the overlapped path was not taken"
    assert llm.overlapped.prefill_launches >= 1
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == hf_greedy(hf, p, m)
        assert o.finish_reason == "length"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_overlapped_chunked_prefill_over_shared_prefixes(tiny_qwen3):
    """Prefill steps launched ahead: prompts cut into chunks, later prompts finding the blocks of earlier
    ones in the prefix cache (hashed when their step was launched), one prompt stopping on its first
    token while the next step is already on its way."""
    path, hf = tiny_qwen3
    llm = overlapped(LLM(path, device="cpu", num_kvcache_blocks=64, max_model_len=200, max_num_batched_tokens=16,
                         kvcache_block_size=4))
    base = list(range(10, 50))
    prompts = [base, base[:33] + [7, 8], base[:20], list(range(60, 75)), base + [3]]
    max_tokens = [6, 9, 1, 4, 5]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.overlapped.prefill_launches >= 4, "the prompts take several overlapped prefill steps"
    assert llm.block_manager.hit_tokens > 0, "later prompts reuse earlier prompts' blocks"
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == hf_greedy(hf, p, m)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_stop_token_found_one_step_late_is_dropped(llm_and_hf):
    llm, hf = llm_and_hf
    prompt = list(range(40, 60))
    ref = hf_greedy(hf, prompt, 30)
    stop = ref[9]  # stops at its first occurrence, while the next step is already launched
    first = ref.index(stop)
    out = llm.generate([prompt, prompt[:7]], [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop]),
                                             SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)],
                       use_tqdm=False)
    assert out[0].token_ids == ref[:first + 1] and out[0].finish_reason == "stop"
    assert out[1].token_ids == hf_greedy(hf, prompt[:7], 25)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_seeded_sampling_is_the_same_with_and_without_overlap(tiny_qwen3):
    path, _ = tiny_qwen3
    prompts = [list(range(5, 25)), list(range(7, 12))]
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=15, seed=123, ignore_eos=True)
    plain = LLM(path, device="cpu", num_kvcache_blocks=64)
    want = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    llm = overlapped(LLM(path, device="cpu", num_kvcache_blocks=64))
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want


def test_fill_decode_inputs_equals_a_loop_over_sequences():
    """The vectorized host side of a graph decode step writes what a plain per-sequence loop writes."""
    import numpy as np

    from nanovllm.engine.cuda_graphs import fill_decode_inputs
    from nanovllm.engine.sequence import Sequence

    rng = np.random.default_rng(0)
    block_size, b, width = 4, 8, 6
    seqs = []
    for i, length in enumerate([1, 4, 5, 17, 9]):
        seq = Sequence(i, rng.integers(0, 100, size=length).tolist())
        seq.block_table = rng.permutation(50)[:-(-length // block_size)].tolist()
        seqs.append(seq)
    ints = np.full((4, b), -1, dtype=np.int64)  # stale placeholders from an earlier step
    context_lens = np.full(b, 7, dtype=np.int32)
    tables = np.full((b, width), 99, dtype=np.int32)
    fill_decode_inputs(seqs, block_size, ints, context_lens, tables)
    for i, seq in enumerate(seqs):
        pos = len(seq) - 1
        assert ints[0, i] == seq.token_ids[-1] and ints[1, i] == pos
        assert ints[2, i] == seq.block_table[pos // block_size] * block_size + pos % block_size
        assert context_lens[i] == len(seq)
        assert tables[i, :len(seq.block_table)].tolist() == seq.block_table
    assert (ints[:2, 5:] == 0).all(), "padding rows: token 0 at position 0 (a stale -1 would index out of range)"
    assert (ints[2, 5:] == -1).all() and (context_lens[5:] == 1).all() and (tables[5:, 0] == 0).all()


def test_generate_puts_off_full_gc_only_while_it_runs(tiny_qwen3):
    """generate() puts off Python's full collections for its loop (they stall the host) and restores the
    thresholds after, also after an error; it leaves frozen objects and a disabled collector alone; two
    engines' loops in two threads restore the thresholds once both are done."""
    import gc

    path, _ = tiny_qwen3
    llm = LLM(path, device="cpu", dtype="float32")
    seen = []
    step = llm._step

    def spy():
        seen.append((gc.get_threshold(), gc.get_freeze_count()))
        return step()

    llm._step = spy
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert seen and all(t[:2] == before[:2] and t[2] >= 1 << 30 for t, _ in seen), seen
    assert all(f == frozen for _, f in seen), "frozen objects are left as they are"
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen

    def fail():
        raise RuntimeError("boom")

    llm._step = fail
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert gc.get_threshold() == before
    llm._step = spy

    seen.clear()
    gc.set_threshold(0)  # the application turned automatic collection off
    try:
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
        assert seen and all(t[0] == 0 for t, _ in seen) and gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)

    # two loops at once (two engines, two threads): the thresholds come back when the last one ends
    other = LLM(path, device="cpu", dtype="float32")
    inside, release = threading.Event(), threading.Event()
    other_step = other._step

    def slow():
        inside.set()
        release.wait(30)
        return other_step()

    other._step = slow
    t = threading.Thread(target=other.generate, args=([[4, 5, 6]], params), kwargs={"use_tqdm": False})
    t.start()
    try:
        assert inside.wait(30)
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
        assert gc.get_threshold()[2] >= 1 << 30, "the other engine's loop still runs"
    finally:
        release.set()
        t.join(30)
    assert gc.get_threshold() == before
