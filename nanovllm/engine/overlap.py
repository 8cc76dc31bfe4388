"""Overlapped execution: step N+1 is scheduled and launched before step N's tokens reach the host.

The plain loop (``LLM.step``) waits for each step's tokens before it schedules the next, so the GPU idles
while the host copies the tokens, appends them, checks for stops and prepares the next batch.  Here the
host runs one step ahead:

    launch N+1  ->  collect N's tokens (the GPU is busy with N+1)  ->  launch N+2  ->  collect N+1 ...

That works only when step N+1 can be scheduled without step N's tokens:

* a prefill step (``can_prefill_ahead``): it computes prompt tokens, which are known;
* a decode step in a pure decode phase (``can_decode_ahead``): nothing waiting, every sequence fits a
  captured CUDA graph, no preemption needed.

A token sampled by a launched step is *pending*: the sequence counts it (``Sequence.num_pending_tokens``,
so the next step is scheduled at the right position and with the right blocks), and the next launch
reads its value straight from the GPU tensor the sampler wrote.  ``resolve`` appends the values when they
reach the host and checks for stops.  A sequence that stops (an end-of-sequence or stop token, a stop
string) has by then computed one token too many, which is dropped (its blocks are released anyway).  Otherwise the loop
falls back to a plain step, after collecting what is pending.

Everything of overlapped execution is in this file: the scheduler's side (``OverlapScheduler``) and the
loop with its two launches (``OverlappedLoop``).
"""

from __future__ import annotations

import numpy as np
import torch

from nanovllm.engine.cuda_graphs import PinnedRing
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import ScheduledBatch, Sequence, SequenceStatus
from nanovllm.layers.sampler import record_prompt_logprobs


class OverlapScheduler(Scheduler):
    """The scheduler, plus what it needs to schedule with tokens still pending."""

    def can_prefill_ahead(self) -> bool:
        """Will the next step be a prefill?  (Then it can be launched before the pending tokens arrive.)
        Not with ``mixed_batches`` while a token is pending: that step would carry the decodes too, and a
        prefill step's inputs are read on the host."""
        if self.config.mixed_batches and any(seq.num_pending_tokens for seq in self.running):
            return False
        if any(seq.num_uncomputed_tokens > 1 for seq in self.running):
            return True
        return (bool(self.waiting) and len(self.running) < self.config.max_num_seqs
                and self.block_manager.can_allocate(self.waiting[0]))

    def can_decode_ahead(self, max_batch: int) -> bool:
        """Can the next decode step be scheduled without knowing the pending tokens?  Only in a pure decode
        phase (nothing waiting, no prefill under way), within ``max_batch``, without preemption, and when no
        request's penalties need the values of its tokens."""
        if self.waiting or not self.running:
            return False
        bm, active, need = self.block_manager, 0, 0
        for seq in self.running:
            if seq.num_uncomputed_tokens > 1 or seq.params.penalized:
                return False
            if self._finishes_by_length(seq):
                continue
            active += 1
            need += bm.blocks_for(len(seq)) > len(seq.block_table)
        return 0 < active <= min(max_batch, self.config.max_num_seqs) and need <= bm.num_free_blocks

    def _finishes_by_length(self, seq: Sequence) -> bool:
        """Is the sequence's pending token its last (by ``max_tokens`` or ``max_model_len``)?"""
        return seq.num_completion_tokens >= seq.params.max_tokens or len(seq) >= self.config.max_model_len

    def _schedule_decode(self) -> ScheduledBatch:
        # a sequence whose pending token is its last has nothing more to compute: leave it out of the step
        # (it stays running, after the scheduled ones, until resolve() finishes it)
        done = [seq for seq in self.running if self._finishes_by_length(seq)]
        if not done:
            return super()._schedule_decode()
        self.running = [seq for seq in self.running if not self._finishes_by_length(seq)]
        batch = super()._schedule_decode()
        n = len(batch.seqs)
        self.running = self.running[:n] + done + self.running[n:]
        return batch

    def postprocess_launched(self, batch: ScheduledBatch) -> list[Sequence]:
        """Book-keeping of a step whose tokens are still on the GPU: each sequence that samples gets a pending
        token.  Returns those sequences, in batch order (what ``resolve`` needs)."""
        sampling = []
        for i, seq in enumerate(batch.seqs):
            samples = batch.samples(i)
            seq.num_computed_tokens += batch.num_new_tokens[i]
            if batch.is_prefill:  # its prompt blocks are computed (by the time a later step reads them)
                self.block_manager.register_computed(seq)
            if samples:
                seq.num_pending_tokens += 1
                if seq.children:
                    self._queue_children(seq)
                sampling.append(seq)
        return sampling

    def resolve(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """The tokens of a launched step have arrived: append them, finish the sequences that are done."""
        finished = []
        for seq, token in zip(seqs, token_ids):
            if seq.status == SequenceStatus.FINISHED:  # it stopped one step earlier: drop this token
                continue
            seq.num_pending_tokens -= 1
            seq.token_ids.append(token)
            seq.finish_reason = self._finish_reason(seq, token, len(seq.token_ids) - 1)
            if seq.finish_reason is not None:
                seq.num_pending_tokens = 0  # a later launch's token for it is dropped
                self._finish(seq)
                finished.append(seq)
            else:
                self.block_manager.register_computed(seq)
        return finished


class OverlappedLoop:
    """Runs an ``OverlapScheduler`` and a ``ModelRunner`` with CUDA graphs one step ahead.

    ``step()`` does what ``LLM.step`` does, launching ahead when it can; ``collect()`` waits for the launched
    step, if any.  A launch keeps its sampled tokens on the GPU (``prev_tokens``; ``prev_rows`` maps a
    sequence to its row) for the next launch, and copies them to pinned host memory behind an event."""

    def __init__(self, scheduler: OverlapScheduler, runner, max_batch: int | None = None):
        self.scheduler, self.runner = scheduler, runner
        self.max_batch = runner.graphs.max_batch if max_batch is None else max_batch  # most rows a launch decodes
        self.pending: tuple[list[Sequence], object] | None = None  # (sequences, ticket) of the step in flight
        self.prev_tokens: torch.Tensor | None = None
        self.prev_rows: dict[int, int] = {}
        self.token_ring: PinnedRing | None = None  # made at the first decode launch

    def step(self) -> tuple[ScheduledBatch | None, list[Sequence]]:
        """One step; returns (the batch scheduled, or None when nothing was left to schedule, the finished
        sequences)."""
        sched = self.scheduler
        if sched.can_prefill_ahead() or sched.can_decode_ahead(self.max_batch):
            batch = sched.schedule()
            ticket = self.launch_prefill(batch) if batch.is_prefill else self.launch_decode(batch.seqs)
            launched = sched.postprocess_launched(batch)
            finished = self.collect()  # the previous step's tokens, while the GPU runs this one
            self.pending = (launched, ticket)
            return batch, finished
        finished = self.collect()
        if not sched.has_unfinished():
            return None, finished
        batch = sched.schedule()
        return batch, finished + sched.postprocess(batch, self.runner.run(batch))

    def collect(self) -> list[Sequence]:
        """Wait for the launched step's tokens and resolve them; returns the sequences that finished."""
        if self.pending is None:
            return []
        seqs, ticket = self.pending
        self.pending = None
        return self.scheduler.resolve(seqs, self.tokens(ticket))

    def reset(self) -> None:
        """Forget the launched step (after an error: its sequences are aborted)."""
        self.pending, self.prev_rows = None, {}

    @torch.inference_mode()
    def launch_decode(self, seqs: list[Sequence]):
        """Launch a decode step without waiting for it.  A sequence with a pending token gets it from the
        previous launch's sampled tokens on the GPU.  Returns a ticket for ``tokens``."""
        rows = np.fromiter((self.prev_rows.get(s.seq_id, -1) if s.num_pending_tokens else -1 for s in seqs),
                           dtype=np.int64, count=len(seqs))
        hidden = self.runner.graphs.replay(seqs, self.prev_tokens if self.prev_rows else None, rows)
        n = len(seqs)
        if self.token_ring is None:  # pinned staging of the sampler's parameters (float64) and the tokens
            self.token_ring = PinnedRing(4, (2 * self.max_batch, torch.float64), (self.max_batch, torch.int64))
        (params_buf, tokens_buf), event = self.token_ring.next()
        logits = self.runner.model.compute_logits(hidden)
        sampled = self.runner.sampler(logits, seqs, params_buf[:2 * n].view(2, n))
        return self._hand_over(sampled, seqs, tokens_buf[:n], event)

    @torch.inference_mode()
    def launch_prefill(self, batch: ScheduledBatch):
        """Launch a prefill step without waiting for it: the forward pass, then one token sampled for each
        sequence that finishes its prompt, left on the GPU for the next launch."""
        runner = self.runner
        hidden, rows = runner.forward(batch)
        record_prompt_logprobs(runner.model.compute_logits, hidden, batch)
        seqs = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        if not seqs:
            self.prev_rows = {}
            return None
        index = runner.to_device(np.asarray(rows, dtype=np.int64), torch.int64)  # no pageable copy: no sync
        sampled = runner.sampler(runner.model.compute_logits(hidden.index_select(0, index)), seqs)
        host = torch.empty(len(seqs), dtype=torch.int64, pin_memory=True)
        return self._hand_over(sampled, seqs, host, torch.cuda.Event())

    def _hand_over(self, sampled: torch.Tensor, seqs: list[Sequence], host: torch.Tensor, event):
        """A launch's sampled tokens: kept on the GPU for the next launch's pending tokens, and copied to the
        pinned ``host`` buffer behind ``event``.  Returns the ticket for ``tokens``."""
        self.prev_tokens = sampled
        self.prev_rows = {s.seq_id: i for i, s in enumerate(seqs)}
        host.copy_(sampled, non_blocking=True)
        event.record()
        return host, event

    @staticmethod
    def tokens(ticket) -> list[int]:
        if ticket is None:  # a launch that sampled nothing
            return []
        host, event = ticket
        event.synchronize()
        return host.tolist()
