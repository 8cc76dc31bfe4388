"""Continuous batching: which sequences run at each step, and how many tokens of each.

A step is either a *prefill* step (sequences with prompt tokens left to compute, chunked so the step stays
within ``max_num_batched_tokens``) or a *decode* step (every running sequence computes its one newest
token).  Prefill work goes first, so new requests join the running batch as soon as blocks allow.  When a
decode step needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are released and it goes back to the front of the queue, to be recomputed later (its cached prefix blocks
usually make that cheap).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens computed this step, per sequence
    is_prefill: bool

    def samples(self, i: int) -> bool:
        """Does sequence i finish computing its tokens this step (and so sample a new one)?"""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == len(seq)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        return batch if batch.seqs else self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        seqs, counts = [], []
        for seq in self.running:  # prefills chunked in earlier steps go first
            if seq.num_uncomputed_tokens > 1 and budget > 0:
                n = min(seq.num_uncomputed_tokens, budget)
                seqs.append(seq), counts.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            if seq.num_preemptions == 0:  # first admission (later ones find the request's own blocks)
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            n = min(seq.num_uncomputed_tokens, budget)
            seqs.append(seq), counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts, is_prefill=True)

    def _schedule_decode(self) -> ScheduledBatch:
        bm = self.block_manager
        queue, scheduled = deque(self.running), []
        limit = min(self.config.max_num_seqs, self.config.max_num_batched_tokens)  # one token per sequence
        finishing = []  # (overlapped decode only) sequences whose pending token is their last
        while queue and len(scheduled) < limit:
            seq = queue.popleft()
            if self._finishes_by_length(seq):
                finishing.append(seq)
                continue
            while not bm.can_append(seq):
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    seq = None
                    break
            if seq is not None:
                bm.append_slot(seq)
                scheduled.append(seq)
        self.running = scheduled + finishing + list(queue)
        if not scheduled:
            raise RuntimeError("the KV cache cannot hold even one sequence: raise num_kvcache_blocks")
        if self.config.decode_longest_first:
            # the attention kernel starts one program per (row, KV head) in row order: longest contexts first
            # keeps the GPU busy to the end instead of finishing on a few long ones (longest-processing-time)
            scheduled = sorted(scheduled, key=len, reverse=True)
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        seq.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int]) -> list[Sequence]:
        """Record what the step computed; append the sampled tokens (one per sequence that sampled, in
        batch order); finish and release sequences that are done.  Returns the finished ones."""
        finished, sampled = [], iter(token_ids)
        for i, seq in enumerate(batch.seqs):
            samples = batch.samples(i)
            seq.num_computed_tokens += batch.num_new_tokens[i]
            self.block_manager.register_computed(seq)
            if not samples:
                continue
            token = next(sampled)
            seq.token_ids.append(token)
            seq.finish_reason = self._finish_reason(seq, token, len(seq) - 1)
            if seq.finish_reason is not None:
                self._finish(seq)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token: int, index: int) -> str | None:
        """Why the sequence ends with ``token`` at position ``index``, if it does."""
        p = seq.params
        if not p.ignore_eos and token in self.config.eos_token_ids:
            return "stop"
        if p.stop_token_ids and token in p.stop_token_ids:
            return "stop"
        if index + 1 - seq.num_prompt_tokens >= p.max_tokens or index + 1 >= self.config.max_model_len:
            return "length"
        return None

    def _finishes_by_length(self, seq: Sequence) -> bool:
        return (seq.num_completion_tokens >= seq.params.max_tokens
                or len(seq) >= self.config.max_model_len)

    def _finish(self, seq: Sequence) -> None:
        if seq.status == SequenceStatus.WAITING:  # preempted while its last token was in flight
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)

    # -- overlapped steps: step N+1 is scheduled and launched before step N's tokens are known ---------
    # Each sequence that samples in a launched step gets a placeholder token, so the next step is scheduled
    # at the right positions; the runner feeds it the real token straight from the GPU.  resolve() fills
    # the placeholders in when the tokens reach the host.  A sequence that stops on an end-of-sequence
    # token has then computed one token too many, which is dropped.  Prefill steps overlap too: what they
    # schedule does not depend on sampled tokens (a sequence waiting for its first token is not prefilled).
    PLACEHOLDER = -1

    def can_prefill_ahead(self) -> bool:
        """Will the next step be a prefill?  (Then it can be launched before the pending tokens arrive.)"""
        if any(seq.num_uncomputed_tokens > 1 for seq in self.running):
            return True
        return (bool(self.waiting) and len(self.running) < self.config.max_num_seqs
                and self.block_manager.can_allocate(self.waiting[0]))

    def can_decode_ahead(self, max_batch: int) -> bool:
        """Can the next decode step be scheduled without knowing the pending tokens?  Only in a pure decode
        phase (nothing waiting, no prefill under way), within ``max_batch``, and without preemption."""
        if self.waiting or not self.running:
            return False
        bm, active, need = self.block_manager, 0, 0
        for seq in self.running:
            if seq.num_uncomputed_tokens > 1:
                return False
            if self._finishes_by_length(seq):
                continue
            active += 1
            need += bm.blocks_for(len(seq)) > len(seq.block_table)
        return 0 < active <= min(max_batch, self.config.max_num_seqs) and need <= bm.num_free_blocks

    def postprocess_launched(self, batch: ScheduledBatch) -> list[tuple[Sequence, int]]:
        """Book-keeping of a step whose tokens are still on the GPU; returns what resolve() needs: (sequence,
        index of its placeholder) for each sequence that samples, in batch order."""
        pending = []
        for i, seq in enumerate(batch.seqs):
            samples = batch.samples(i)
            seq.num_computed_tokens += batch.num_new_tokens[i]
            if batch.is_prefill:  # its prompt blocks are computed (by the time a later step reads them)
                self.block_manager.register_computed(seq)
            if samples:
                seq.token_ids.append(self.PLACEHOLDER)
                pending.append((seq, len(seq.token_ids) - 1))
        return pending

    def resolve(self, pending: list[tuple[Sequence, int]], token_ids: list[int]) -> list[Sequence]:
        """Fill in the tokens of a launched step; finish the sequences that are done."""
        finished = []
        for (seq, index), token in zip(pending, token_ids):
            if seq.status == SequenceStatus.FINISHED:  # it stopped one step earlier: drop this token
                continue
            seq.token_ids[index] = token
            seq.finish_reason = self._finish_reason(seq, token, index)
            if seq.finish_reason is not None:
                del seq.token_ids[index + 1:]
                self._finish(seq)
                finished.append(seq)
            else:
                self.block_manager.register_computed(seq)
        return finished

    def abort_all(self) -> None:
        """Drop every request and release its blocks (after an error, so the engine stays usable)."""
        for seq in self.running:
            self.block_manager.deallocate(seq)
            seq.status = SequenceStatus.FINISHED
        self.running.clear()
        self.waiting.clear()
