"""Continuous batching: which sequences run at each step, and how many tokens of each.

A step is either a *prefill* step (sequences with prompt tokens left to compute, chunked so the step stays
within ``max_num_batched_tokens``) or a *decode* step (every running sequence computes its one newest
token).  Prefill work goes first, so new requests join the running batch as soon as blocks allow.  When a
decode step needs a block and none is free, the most recently admitted sequence is preempted: its blocks
are released and it goes back to the front of the queue, to be recomputed later (its cached prefix blocks
usually make that cheap).

With ``mixed_batches`` (Sarathi-Serve's stall-free batching), a step that has prefill work to do carries
every running decode as well: the decodes take one token each of the step's budget, prefill chunks the
rest.  Without it, a long prompt arriving stalls every request that is generating for as many steps as
its prefill takes; with it their tokens keep coming, each step a little slower.

This is the plain loop: a step's tokens are known before the next step is scheduled.  ``engine/overlap.py``
extends it to schedule and launch step N+1 while step N still runs on the GPU.
"""

from __future__ import annotations

from collections import deque

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import ScheduledBatch, Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # speculative decoding (``spec_decode.py``): decode steps take cache slots for this many draft tokens
        self.num_lookahead = config.num_speculative_tokens if config.speculative_method else 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        if self.config.mixed_batches:
            return self._schedule_mixed()
        batch = self._schedule_prefill()
        return batch if batch.seqs else self._schedule_decode()

    def _schedule_mixed(self) -> ScheduledBatch:
        """The running decodes first (one token each), then prefill chunks in the budget left over.  A step
        with no prefill work is a plain decode step (and replays a decode graph on a GPU)."""
        if not self.waiting and not any(s.num_uncomputed_tokens > 1 for s in self.running):
            return self._schedule_decode()
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        limit = min(self.config.max_num_seqs, self.config.max_num_batched_tokens - 1)  # >= 1 token for prefill
        decodes = self._append_slots(decoding, limit)
        self.running = [s for s in self.running if s.status == SequenceStatus.RUNNING]  # less the preempted
        prefill = self._schedule_prefill(self.config.max_num_batched_tokens - len(decodes))
        if not prefill.seqs:
            if not decodes:
                raise RuntimeError("the KV cache cannot hold even one sequence: raise num_kvcache_blocks")
            return ScheduledBatch(decodes, [1] * len(decodes), is_prefill=False)
        return ScheduledBatch(decodes + prefill.seqs, [1] * len(decodes) + prefill.num_new_tokens, is_prefill=True)

    def _schedule_prefill(self, budget: int | None = None) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens if budget is None else budget
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

    def draft_room(self, seq: Sequence) -> int:
        """How many draft tokens a decode step may verify for the sequence (speculative decoding): the
        lookahead, less near the end (a step adds at most its drafts + 1 tokens), so the slots it takes never
        exceed what the request can use."""
        room = min(self.num_lookahead, seq.params.max_tokens - seq.num_completion_tokens,
                   self.config.max_model_len - len(seq)) - 1
        return max(0, min(room, self.num_lookahead))

    def _schedule_decode(self) -> ScheduledBatch:
        # one token per sequence (with speculative decoding up to 1 + num_lookahead, all within the budget)
        limit = min(self.config.max_num_seqs, max(1, self.config.max_num_batched_tokens // (1 + self.num_lookahead)))
        scheduled = self._append_slots(self.running, limit, lookahead=self.num_lookahead > 0)
        chosen = set(map(id, scheduled))
        self.running = scheduled + [s for s in self.running
                                    if s.status == SequenceStatus.RUNNING and id(s) not in chosen]
        if not scheduled:
            raise RuntimeError("the KV cache cannot hold even one sequence: raise num_kvcache_blocks")
        if self.config.decode_longest_first:
            # the attention kernel starts one program per (row, KV head) in row order: longest contexts first
            # keeps the GPU busy to the end instead of finishing on a few long ones (longest-processing-time)
            scheduled = sorted(scheduled, key=len, reverse=True)
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False)

    def _append_slots(self, candidates: list[Sequence], limit: int, lookahead: bool = False) -> list[Sequence]:
        """A cache slot for the next token of each candidate (and with ``lookahead`` for its draft tokens,
        ``draft_room``), in order, for at most ``limit`` of them.  When no block is free, the last candidate
        is preempted (recomputed later), until the others fit.  Returns the candidates that got their slots."""
        bm = self.block_manager
        queue, scheduled = deque(candidates), []
        while queue and len(scheduled) < limit:
            seq = queue.popleft()
            extra = self.draft_room(seq) if lookahead else 0
            while not bm.can_append(seq, extra):
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    seq = None
                    break
            if seq is not None:
                bm.append_slot(seq, extra)
                scheduled.append(seq)
        return scheduled

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
            if seq.children:
                self._queue_children(seq)
            seq.finish_reason = self._finish_reason(seq, token, len(seq) - 1)
            if seq.finish_reason is not None:
                self._finish(seq)
                finished.append(seq)
        return finished

    def postprocess_verified(self, batch: ScheduledBatch, accepted: list[list[int]]) -> list[Sequence]:
        """Record a verify step (speculative decoding): sequence i gets ``accepted[i]``, its accepted draft
        tokens then one token of the target's own.  They are appended one at a time with the stop checks, so
        nothing past a stop or ``max_tokens`` is kept.  The K/V of every kept token but the last is computed;
        the rejected drafts' K/V is left to be overwritten, and blocks taken for them are released (they were
        never hashed: ``register_computed`` reaches only the computed tokens).  Returns the finished ones."""
        finished = []
        for seq, tokens in zip(batch.seqs, accepted):
            for token in tokens:
                seq.token_ids.append(token)
                seq.finish_reason = self._finish_reason(seq, token, len(seq) - 1)
                if seq.finish_reason is not None:
                    break
            seq.num_computed_tokens = len(seq) - 1
            self.block_manager.register_computed(seq)
            if seq.finish_reason is not None:
                self._finish(seq)
                finished.append(seq)
            else:
                self.block_manager.trim(seq)
        return finished

    def _queue_children(self, seq: Sequence) -> None:
        """``n`` > 1: the other completions join the front of the queue when this one samples its first token.
        Its prompt's full blocks are then computed and hashed, so they find them in the prefix cache (shared,
        counted once) and each computes only the prompt's last, partial block before sampling its own token."""
        if seq.num_completion_tokens == 1:
            self.waiting.extendleft(reversed(seq.children))

    def _finish_reason(self, seq: Sequence, token: int, index: int) -> str | None:
        """Why the sequence ends with ``token`` at position ``index``, if it does (vLLM's order: before
        ``min_tokens`` only the length ends it; then end-of-sequence, stop tokens, stop strings, length).
        Sets ``stop_reason`` (a stop token or string) and ``stop_text`` (the text cut at a stop string)."""
        p = seq.params
        count = index + 1 - seq.num_prompt_tokens
        if count >= p.min_tokens:
            if not p.ignore_eos and token in self.config.eos_token_ids:
                return "stop"
            if p.stop_token_ids and token in p.stop_token_ids:
                seq.stop_reason = token
                return "stop"
        if seq.detokenizer is not None and self._stop_string(seq, token, count >= p.min_tokens):
            return "stop"
        if count >= p.max_tokens or index + 1 >= self.config.max_model_len:
            return "length"
        return None

    @staticmethod
    def _stop_string(seq: Sequence, token: int, may_stop: bool) -> bool:
        """Add ``token`` to the sequence's text; does the text now hold a stop string?  Only the new text and
        the stop string's length before it are searched."""
        stops, new = seq.params.stop, seq.detokenizer.add([token])
        if not (new and may_stop):
            return False
        text = seq.detokenizer.text
        start = max(0, len(text) - len(new) - max(map(len, stops)) + 1)
        found = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
        if not found:
            return False
        i, stop = min(found, key=lambda f: f[0])
        seq.stop_reason = stop
        seq.stop_text = text[:i + len(stop)] if seq.params.include_stop_str_in_output else text[:i]
        return True

    def _finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)

    def abort(self, seq: Sequence) -> bool:
        """End one request now, wherever it is (waiting or running), with finish reason "abort", and release
        its blocks; with it the other completions of an ``n`` > 1 request.  Returns False if it had already
        finished.  (A token of it still in flight in an
        overlapped step is dropped when it arrives: ``OverlapScheduler.resolve`` skips finished sequences.)"""
        for child in seq.children:  # the other completions of an n > 1 request (queued, or not yet)
            if child.status != SequenceStatus.FINISHED and child not in self.running and child not in self.waiting:
                child.status, child.finish_reason = SequenceStatus.FINISHED, "abort"
            else:
                self.abort(child)
        if seq.status == SequenceStatus.FINISHED:
            return False
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        else:
            self.waiting.remove(seq)
        seq.num_pending_tokens = 0
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        return True

    def abort_all(self) -> None:
        """Drop every request and release its blocks (after an error, so the engine stays usable)."""
        for seq in self.running:
            self.block_manager.deallocate(seq)
            seq.status = SequenceStatus.FINISHED
        self.running.clear()
        self.waiting.clear()
