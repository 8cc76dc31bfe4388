"""The paged KV block manager: unit tests of each rule, then hypothesis-driven random workloads run
through the real Scheduler with a fake model runner, checking every invariant after every operation.

The fake runner also keeps a fake KV cache: each slot it "computes" records the whole token prefix that
produced it (K/V at position p depends on tokens 0..p).  Before each step it checks that every slot a
sequence will attend to holds exactly that sequence's prefix, so a wrongly shared, evicted-while-used or
overwritten block is caught even when all the bookkeeping looks consistent.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager, block_hash
from nanovllm.engine.overlap import OverlapScheduler
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

BS = 4  # block size of the unit tests


def make_seq(seq_id, tokens, **params):
    return Sequence(seq_id, list(tokens), SamplingParams(**params) if params else None)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What a prefill step does to the block manager: every token computed, full blocks registered."""
    seq.num_computed_tokens = len(seq)
    bm.register_computed(seq)


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    free = set(bm.free)
    assert len(free) == len(bm.free) == bm.num_free_blocks
    for b in bm.blocks:
        if b.block_id in free:
            assert b.ref_count == 0, f"{b} is in the free queue with a reference"
        else:
            assert b.ref_count > 0, f"{b} is neither free nor referenced (leaked)"
    assert sum(b.ref_count for b in bm.blocks) == sum(len(s.block_table) for s in live)
    for s in live:
        assert len(set(s.block_table)) == len(s.block_table), f"a block appears twice in {s}"
    for h, bid in bm.hash_to_block.items():
        assert bm.blocks[bid].hash == h, f"hash_to_block[{h}] -> {bm.blocks[bid]}"


# ---------------------------------------------------------------------------------------------------
# unit tests
# ---------------------------------------------------------------------------------------------------


def test_blocks_for():
    bm = BlockManager(4, BS)
    assert [bm.blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_zero_blocks_rejected():
    with pytest.raises(ValueError, match="num_kvcache_blocks"):
        BlockManager(0, BS)


def test_allocate_and_free():
    bm = BlockManager(8, BS)
    seq = make_seq(0, range(10))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert seq.num_computed_tokens == 0
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    check_invariants(bm, [seq])
    bm.deallocate(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in bm.blocks)
    check_invariants(bm, [])


def test_can_allocate_counts_free_blocks():
    bm = BlockManager(3, BS, enable_prefix_caching=False)
    a = make_seq(0, range(8))  # 2 blocks
    bm.allocate(a)
    assert not bm.can_allocate(make_seq(1, range(100, 105)))  # needs 2, 1 free
    assert bm.can_allocate(make_seq(2, range(100, 104)))  # needs 1


def test_append_slot_adds_a_block_only_when_needed():
    bm = BlockManager(4, BS)
    seq = make_seq(0, range(4))
    bm.allocate(seq)
    compute_all(bm, seq)
    seq.token_ids.append(99)  # a sampled token: 5 tokens need 2 blocks
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    seq.num_computed_tokens += 1
    seq.token_ids.append(98)  # 6 tokens: still 2 blocks
    bm.append_slot(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    check_invariants(bm, [seq])


def test_can_append_false_when_cache_full():
    bm = BlockManager(1, BS)
    seq = make_seq(0, range(4))
    bm.allocate(seq)
    compute_all(bm, seq)
    seq.token_ids.append(7)
    assert not bm.can_append(seq)


def test_shared_prefix_blocks_are_ref_counted():
    bm = BlockManager(10, BS)
    a = make_seq(0, list(range(8)) + [50, 51])
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(1, list(range(8)) + [60, 61, 62])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 8
    assert [bm.blocks[x].ref_count for x in a.block_table] == [2, 2, 1]
    check_invariants(bm, [a, b])
    bm.deallocate(a)
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1, 1]
    check_invariants(bm, [b])
    bm.deallocate(b)
    assert bm.num_free_blocks == 10
    check_invariants(bm, [])


def test_partial_block_is_not_shared():
    bm = BlockManager(10, BS)
    a = make_seq(0, range(6))
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(1, range(6))  # same 6 tokens: only the full first block can be shared
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert b.num_computed_tokens == 4


def test_uncomputed_blocks_are_not_shared():
    bm = BlockManager(10, BS)
    a = make_seq(0, range(8))
    bm.allocate(a)  # allocated, not computed yet
    b = make_seq(1, range(8))
    bm.allocate(b)
    assert not set(a.block_table) & set(b.block_table) and b.num_computed_tokens == 0


def test_chained_hash_depends_on_prefix():
    t = (1, 2, 3, 4)
    h1, h2 = block_hash((5, 6, 7, 8), None), block_hash((9, 9, 9, 9), None)
    assert block_hash(t, h1) != block_hash(t, h2)
    assert block_hash(t, h1) == block_hash(list(t), h1)
    assert block_hash(t, None) != block_hash(t, h1)
    assert block_hash((1, 2, 3, 4), None) != block_hash((4, 3, 2, 1), None)


def test_same_block_after_different_prefix_is_not_a_hit():
    bm = BlockManager(10, BS)
    a = make_seq(0, [1, 1, 1, 1, 7, 7, 7, 7, 0])
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(1, [2, 2, 2, 2, 7, 7, 7, 7, 0])  # second block has the same tokens, after another prefix
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    assert not set(a.block_table) & set(b.block_table)
    compute_all(bm, b)
    assert bm.blocks[a.block_table[1]].hash != bm.blocks[b.block_table[1]].hash


def test_fully_cached_prompt_keeps_one_token_to_compute():
    bm = BlockManager(10, BS)
    a = make_seq(0, range(8))
    bm.allocate(a)
    compute_all(bm, a)
    first, second = a.block_table
    bm.deallocate(a)
    b = make_seq(1, range(8))
    bm.allocate(b)
    assert b.block_table[0] == first  # the first block is a hit ...
    assert b.num_computed_tokens == 4  # ... the last one is recomputed, so its logits give the next token
    assert b.num_computed_tokens < len(b)
    check_invariants(bm, [b])


def test_freed_cached_blocks_are_reclaimed_least_recently_freed_first():
    bm = BlockManager(3, BS)
    seqs = [make_seq(i, [10 * i + j for j in range(4)]) for i in range(3)]
    for s in seqs:
        bm.allocate(s)
        compute_all(bm, s)
    owners = [s.block_table[0] for s in seqs]
    for i in (1, 0, 2):  # free in this order
        bm.deallocate(seqs[i])
    new = make_seq(9, range(100, 104))
    bm.allocate(new)
    assert new.block_table == [owners[1]]  # least recently freed is reclaimed first
    assert bm.blocks[owners[1]].hash is None
    # the evicted prompt is gone from the cache, the other two are still found
    hits = [bm._cached_prefix(make_seq(20 + i, [10 * i + j for j in range(4)] + [0])) for i in range(3)]
    assert hits == [[owners[0]], [], [owners[2]]]
    newer = make_seq(10, range(200, 204))
    bm.allocate(newer)
    assert newer.block_table == [owners[0]]  # next: freed second
    check_invariants(bm, [new, newer])


def test_uncached_free_blocks_are_reclaimed_before_cached_ones():
    bm = BlockManager(3, BS)
    cached = make_seq(0, range(4))
    bm.allocate(cached)
    compute_all(bm, cached)
    partial = make_seq(1, range(50, 53))  # 3 tokens: its block never gets a hash
    bm.allocate(partial)
    compute_all(bm, partial)
    [never_used] = list(bm.free)
    cached_block, partial_block = cached.block_table[0], partial.block_table[0]
    bm.deallocate(cached)
    bm.deallocate(partial)  # freed last, but uncached: it goes first
    assert list(bm.free) == [partial_block, never_used, cached_block]
    x = make_seq(2, range(100, 103))
    bm.allocate(x)
    y = make_seq(3, range(200, 203))
    bm.allocate(y)
    assert x.block_table == [partial_block] and y.block_table == [never_used]
    # the cached block survived both allocations and is still found
    assert bm._cached_prefix(make_seq(4, list(range(4)) + [1])) == [cached_block]


def test_tail_blocks_of_a_freed_sequence_are_evicted_before_its_head():
    """Evicting block 0 of a chain makes the later blocks unreachable anyway, so the tail goes first."""
    bm = BlockManager(3, BS)
    a = make_seq(0, range(12))
    bm.allocate(a)
    compute_all(bm, a)
    head, mid, tail = a.block_table
    bm.deallocate(a)
    b = make_seq(1, range(100, 104))
    bm.allocate(b)
    assert b.block_table == [tail]
    c = make_seq(2, list(range(8)) + [0])
    assert bm._cached_prefix(c) == [head, mid]


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(8, BS)
    a = make_seq(0, range(8))
    bm.allocate(a)
    compute_all(bm, a)
    bm.deallocate(a)
    running = make_seq(1, range(100, 105))
    bm.allocate(running)
    compute_all(bm, running)
    bm.reset_prefix_cache()
    b = make_seq(2, list(range(8)) + [0])
    bm.allocate(b)
    assert b.num_computed_tokens == 0  # the freed prompt was forgotten
    c = make_seq(3, list(range(100, 104)) + [0])
    bm.allocate(c)
    assert c.num_computed_tokens == 4 and c.block_table[0] == running.block_table[0]  # in use: kept
    check_invariants(bm, [running, b, c])


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(0, range(8))
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.hash_to_block == {} and all(b.hash is None for b in bm.blocks)
    b = make_seq(1, range(9))
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)


def test_can_allocate_counts_reclaimed_cached_blocks():
    """Free cached blocks that become hits are taken out of the free queue: they cannot also be used as
    fresh blocks, and pinned (in-use) hits cost nothing."""
    bm = BlockManager(4, BS)
    a = make_seq(0, range(8))
    bm.allocate(a)
    compute_all(bm, a)
    bm.deallocate(a)
    b = make_seq(1, list(range(8)) + list(range(100, 108)))  # 4 blocks, 2 of them free hits
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert bm.num_free_blocks == 0 and b.num_computed_tokens == 8
    check_invariants(bm, [b])
    bm.deallocate(b)
    c = make_seq(2, list(range(8)) + list(range(100, 109)))  # 5 blocks > 4
    assert not bm.can_allocate(c)
    # two holders of the same prefix: the second one needs only its own tail
    bm2 = BlockManager(3, BS)
    d = make_seq(3, range(8))
    bm2.allocate(d)
    compute_all(bm2, d)
    e = make_seq(4, list(range(8)) + [1])  # 2 pinned hits + 1 fresh block
    assert bm2.can_allocate(e)
    bm2.allocate(e)
    assert bm2.num_free_blocks == 0
    check_invariants(bm2, [d, e])


def test_hit_requires_matching_tokens_not_just_hash(monkeypatch):
    """A hash collision must not share a block whose tokens differ."""
    import nanovllm.engine.block_manager as bm_mod

    monkeypatch.setattr(bm_mod, "block_hash", lambda tokens, prefix: 42)  # everything collides
    bm = BlockManager(8, BS)
    a = make_seq(0, range(8))
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(1, range(50, 58))
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)


# ---------------------------------------------------------------------------------------------------
# property tests: random workloads through Scheduler + BlockManager with a fake runner
# ---------------------------------------------------------------------------------------------------

ALPHABET = st.integers(0, 2)  # tiny alphabet: prompts and sampled tokens collide, so prefixes are shared
EOS = 0
SAMPLED = st.sampled_from([1, 1, 1, 2, 1, 0, 1, 2, 1, 1])  # mostly not eos (0) or the stop token (2)


class FakeRunner:
    """Checks each scheduled batch against the block tables and a fake KV cache, then 'computes' it.

    It also plays the GPU of overlapped execution: ``launch`` samples tokens that the host sees only later
    (``OverlapScheduler.resolve``); like the real loop, it can feed a pending token only from the launch
    just before."""

    def __init__(self, bm: BlockManager, config: EngineConfig):
        self.bm, self.config = bm, config
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix whose K/V it holds
        self.prev: dict[int, int] = {}  # seq_id -> token the previous launch sampled (still on the "GPU")

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.bm.block_size] * self.bm.block_size + pos % self.bm.block_size

    def true_tokens(self, seq: Sequence, launched: bool) -> list[int]:
        toks = list(seq.token_ids)
        assert seq.num_pending_tokens <= 1, f"{seq}: more than the last token pending"
        if seq.num_pending_tokens:
            assert launched, f"{seq}: a pending token reached a normal step"
            assert seq.seq_id in self.prev, f"{seq}: pending token not produced by the previous launch"
            toks.append(self.prev[seq.seq_id])
        assert len(toks) == len(seq)
        return toks

    def check_and_compute(self, batch, launched: bool) -> list[bool]:
        config = self.config
        assert batch.seqs, "an empty batch"
        assert len(batch.seqs) == len(batch.num_new_tokens)
        assert len({s.seq_id for s in batch.seqs}) == len(batch.seqs), "a sequence scheduled twice"
        assert sum(batch.num_new_tokens) <= config.max_num_batched_tokens
        assert len(batch.seqs) <= config.max_num_seqs
        if not batch.is_prefill:
            assert all(n == 1 for n in batch.num_new_tokens)
        sampling, truth = [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.status == SequenceStatus.RUNNING
            assert n >= 1 and seq.num_computed_tokens + n <= len(seq)
            end = seq.num_computed_tokens + n
            assert len(seq.block_table) >= self.bm.blocks_for(end), f"{seq} has no block for its tokens"
            toks = self.true_tokens(seq, launched)
            for p in range(seq.num_computed_tokens):  # the context it attends to must be its own prefix
                assert self.kv.get(self.slot(seq, p)) == tuple(toks[:p + 1]), \
                    f"{seq}: cached K/V at position {p} belongs to another prefix"
            sampling.append(end == len(seq))
            truth.append(toks)
        # write the new K/V (after all checks: within one step nothing reads what this step writes)
        for seq, n, toks in zip(batch.seqs, batch.num_new_tokens, truth):
            for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                self.kv[self.slot(seq, p)] = tuple(toks[:p + 1])
        return sampling

    def run(self, batch) -> list[bool]:
        self.prev = {}
        return self.check_and_compute(batch, launched=False)

    def launch(self, batch, tokens: list[int]) -> list[int]:
        """``tokens``: one per sequence that samples.  A prefill never meets a pending token (a sequence waiting
        for its sampled token is not prefilled); a decode step meets those of the launch just before."""
        sampling = self.check_and_compute(batch, launched=not batch.is_prefill)
        assert batch.is_prefill or all(sampling)
        sampled = [s for s, samples in zip(batch.seqs, sampling) if samples]
        assert len(tokens) == len(sampled)
        self.prev = {s.seq_id: t for s, t in zip(sampled, tokens)}
        return tokens


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(2, 12),
                max_num_seqs=st.integers(1, 4), max_num_batched_tokens=st.integers(1, 24),
                caching=st.booleans(), max_model_len=st.integers(4, 24),
                overlap=st.booleans(), max_graph_batch=st.integers(1, 4), longest_first=st.booleans())
    def setup(self, block_size, num_blocks, max_num_seqs, max_num_batched_tokens, caching, max_model_len,
              overlap, max_graph_batch, longest_first):
        self.config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   kvcache_block_size=block_size, num_kvcache_blocks=num_blocks,
                                   enable_prefix_caching=caching, decode_longest_first=longest_first,
                                   eos_token_ids=(EOS,))
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.sched = (OverlapScheduler if overlap else Scheduler)(self.config, self.bm)
        self.runner = FakeRunner(self.bm, self.config)
        self.overlap, self.max_graph_batch = overlap, max_graph_batch
        self.pending = None  # (what postprocess_launched returned, the launch's tokens)
        self.next_id = 0
        self.all_seqs: list[Sequence] = []

    # -- helpers -------------------------------------------------------------------------------------
    def live(self) -> list[Sequence]:
        return list(self.sched.running) + list(self.sched.waiting)

    def step(self, data) -> None:
        """One iteration of LLM._run's loop, overlapped decode included."""
        sched = self.sched

        def draw(k):  # the fake model's tokens; when draining, never eos, so lengths end everything
            return [data.draw(SAMPLED, label="sampled") for _ in range(k)] if data else [1] * k

        prefill_ahead = self.overlap and sched.can_prefill_ahead()
        if self.overlap and (prefill_ahead or sched.can_decode_ahead(self.max_graph_batch)):
            batch = sched.schedule()
            assert batch.is_prefill == prefill_ahead, "can_prefill_ahead() promised the kind of the next step"
            sampling = [batch.samples(i) for i in range(len(batch.seqs))]
            tokens = self.runner.launch(batch, draw(sum(sampling)))
            states = [(len(s), s.num_computed_tokens, s.num_pending_tokens, len(s.token_ids), n)
                      for s, n in zip(batch.seqs, batch.num_new_tokens)]
            launched = sched.postprocess_launched(batch)
            for seq, (length, computed, pending, known, n), samples in zip(batch.seqs, states, sampling):
                assert len(seq) == length + samples and seq.num_pending_tokens == pending + samples
                assert len(seq.token_ids) == known, "a launch appends no token value"
                assert seq.num_computed_tokens == computed + n
            assert launched == [s for s, samples in zip(batch.seqs, sampling) if samples]
            finished = sched.resolve(*self.pending) if self.pending else []
            self.pending = (launched, tokens)
            event("overlapped prefill launch" if batch.is_prefill else "overlapped decode launch")
            if any(s.finish_reason == "stop" and s.seq_id in self.runner.prev for s in finished):
                event("overlapped: stopped with a token in flight")
        else:
            finished = sched.resolve(*self.pending) if self.pending else []
            self.pending = None
            if sched.has_unfinished():
                preemptions = sched.num_preemptions
                batch = sched.schedule()
                sampling = self.runner.run(batch)
                if sched.num_preemptions > preemptions:
                    event("scheduler preempted")
                if batch.is_prefill and any(s.num_computed_tokens > 0 and s.num_completion_tokens == 0
                                            for s in batch.seqs):
                    event("prefill with computed (cached or chunked) tokens")
                if batch.is_prefill and not all(sampling):
                    event("chunked prefill")
                states = [(len(s), s.num_computed_tokens, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
                more = sched.postprocess(batch, draw(sum(sampling)))
                for seq, (length, computed, n), samples in zip(batch.seqs, states, sampling):
                    assert len(seq) == length + samples
                    if not seq.is_finished:  # finishing releases the blocks and resets the count
                        assert seq.num_computed_tokens == computed + n
                assert {s.seq_id for s in more} == {s.seq_id for s in batch.seqs if s.is_finished}
                finished += more
        for seq in finished:
            self.check_finished(seq)
        for seq in self.live():  # nothing finished is left behind
            assert not seq.is_finished

    def check_finished(self, seq: Sequence) -> None:
        p = seq.params
        assert seq.block_table == [] and seq.status == SequenceStatus.FINISHED
        assert seq.num_pending_tokens == 0
        assert seq.num_completion_tokens >= 1
        assert seq.num_completion_tokens <= p.max_tokens and len(seq) <= self.config.max_model_len
        last = seq.token_ids[-1]
        stop = (not p.ignore_eos and last == EOS) or last in (p.stop_token_ids or [])
        if stop:
            assert seq.finish_reason == "stop"
        else:
            assert seq.finish_reason == "length"
            assert seq.num_completion_tokens == p.max_tokens or len(seq) == self.config.max_model_len
        # no earlier completion token should have stopped it
        for t in seq.completion_token_ids[:-1]:
            assert not ((not p.ignore_eos and t == EOS) or t in (p.stop_token_ids or []))

    # -- rules ---------------------------------------------------------------------------------------
    @rule(prompt=st.lists(ALPHABET, min_size=1, max_size=20), max_tokens=st.integers(1, 8),
          ignore_eos=st.booleans(), stop=st.sampled_from([None, [], [2]]))
    def add(self, prompt, max_tokens, ignore_eos, stop):
        if len(prompt) >= self.config.max_model_len:
            prompt = prompt[:self.config.max_model_len - 1]
        # what LLM.generate checks first: the request can fit in the cache on its own
        if self.bm.blocks_for(min(len(prompt) + max_tokens, self.config.max_model_len)) > self.bm.num_blocks:
            return
        seq = Sequence(self.next_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                                            stop_token_ids=stop))
        self.next_id += 1
        self.all_seqs.append(seq)
        self.sched.add(seq)

    @precondition(lambda self: self.sched.has_unfinished() or self.pending)
    @rule(data=st.data())
    def schedule_and_compute(self, data):
        self.step(data)

    @precondition(lambda self: self.sched.has_unfinished() or self.pending)
    @rule(data=st.data(), steps=st.integers(2, 12))
    def run_steps(self, data, steps):
        for _ in range(steps):
            if not (self.sched.has_unfinished() or self.pending):
                break
            self.step(data)
            self.blocks_consistent()
            self.scheduler_consistent()

    @precondition(lambda self: self.sched.running and not self.pending)  # the engine never preempts then
    @rule(which=st.integers(0, 10))
    def preempt(self, which):
        seq = self.sched.running.pop(which % len(self.sched.running))
        self.sched._preempt(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0 and self.sched.waiting[0] is seq

    @precondition(lambda self: self.sched.has_unfinished())
    @rule()
    def abort_all(self):  # what LLM.generate does when a step raises
        self.sched.abort_all()
        self.pending = None
        assert not self.sched.has_unfinished()
        assert self.bm.num_free_blocks == self.bm.num_blocks

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()

    # -- invariants ----------------------------------------------------------------------------------
    @invariant()
    def blocks_consistent(self):
        if not hasattr(self, "bm"):
            return
        check_invariants(self.bm, self.live())

    @invariant()
    def scheduler_consistent(self):
        if not hasattr(self, "sched"):
            return
        assert len(self.sched.running) <= self.config.max_num_seqs
        assert len({s.seq_id for s in self.live()}) == len(self.live())
        for seq in self.sched.running:
            assert seq.status == SequenceStatus.RUNNING
            assert 0 <= seq.num_computed_tokens < len(seq) <= self.config.max_model_len
            assert len(seq.block_table) >= self.bm.blocks_for(seq.num_computed_tokens)
        for seq in self.sched.waiting:
            assert seq.status == SequenceStatus.WAITING
            assert seq.block_table == [] and seq.num_computed_tokens == 0
            assert seq.num_pending_tokens == 0
        for seq in self.all_seqs:
            if seq.is_finished:
                assert seq.block_table == []
            assert seq.num_computed_tokens <= len(seq)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # finish everything: must end (no livelock) and give every block back
        live = self.live()
        bound = 10 + 4 * sum(len(s) + s.params.max_tokens for s in live) * max(1, len(live))
        for _ in range(bound):
            if not (self.sched.has_unfinished() or self.pending):
                break
            self.step(None)
            check_invariants(self.bm, self.live())
        assert not self.sched.has_unfinished() and not self.pending, "the scheduler did not finish its work"
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        assert self.bm.num_hashed == {}
        for seq in self.all_seqs:
            assert seq.is_finished or seq.status == SequenceStatus.WAITING  # (waiting: dropped by abort_all)


SchedulerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestSchedulerMachine = SchedulerMachine.TestCase
