"""CUDA graphs: capture a step per size bucket, replay it each step.  Decode steps and short prefills.

A decode step of a small model is hundreds of small kernels; launched one by one from Python, the host
cannot keep up with the GPU.  A captured graph launches them all at once.  A graph replays fixed memory:
every step copies its inputs into the same static buffers (``input_ids``, ``positions``, ``slot_mapping``,
``context_lens``, ``block_tables``) and reads the output from ``hidden``.  One graph per bucket of batch
sizes (1, 2, 4, 8, 16, 32, ...); a batch runs in the smallest bucket that holds it, padded with rows that
store nothing.  The graphs share one memory pool (captured largest first), and every shape runs once
before its capture, so that compiled kernels are built outside the capture.

The inputs of a step travel in three host-to-device copies from pinned buffers: the four int64 vectors
sit in the rows of one buffer (``ints``), of which the named buffers are views.

Prefill (``PrefillGraphs``): a lone request's prefill is the same few hundred launches, over more tokens.
Up to a couple of thousand tokens the GPU finishes each kernel faster than Python launches the next, so
the time to the first token is set by the host, not by the prompt.  So prefill steps of up to
``PREFILL_GRAPH_MAX_SEQS`` sequences and ``PREFILL_GRAPH_MAX_TOKENS`` tokens are captured too, one graph
per bucket of token counts.  A step runs in the smallest bucket that holds its tokens; padding tokens
(token 0 at position 0, slot -1) belong to no sequence, and padding sequences have no new tokens and no
context, so the attention kernel skips them and nothing is stored for them.  The grid of the prefill
kernel is sized by ``max_seqlen_q``, which a graph fixes at its bucket: programs past a sequence's
tokens return at once.  Both kinds of graph share one memory pool (they never run at the same time, and
their outputs are copied into static buffers allocated outside it).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from nanovllm.attention.base import AttentionMetadata
from nanovllm.engine.sequence import ScheduledBatch, Sequence
from nanovllm.utils import cdiv

PREFILL_GRAPH_MAX_TOKENS = 2048  # longer prefills are launched eagerly: there the GPU work dominates
PREFILL_GRAPH_MAX_SEQS = 16  # every graph's attention grid covers this many sequences, most of them empty


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The buckets: 1, 2, 4, 8, then every 16 up to ``max_num_seqs`` (at most 512)."""
    top = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4, 8) if b < top] + list(range(16, top, 16)) + [top]
    return sorted(set(sizes))


def graph_token_sizes(max_tokens: int) -> list[int]:
    """The prefill buckets: 16, 32, ..., 256, then 384, 512, 768, 1024, 1536, 2048 (each step wastes at most
    a third of its tokens on padding past 256), up to ``max_tokens`` (which is itself the top bucket)."""
    top = min(max_tokens, PREFILL_GRAPH_MAX_TOKENS)
    sizes = [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048]
    return [t for t in sizes if t < top] + [top]


def fill_prefill_inputs(seqs: list[Sequence], num_new_tokens: list[int], block_size: int, ints: np.ndarray,
                        lens: np.ndarray, block_tables: np.ndarray,
                        draft_tokens: list[list[int]] | None = None) -> None:
    """The host side of a padded prefill step: ``ints`` [3, t] gets the new tokens' ids, positions and cache
    slots, then padding (token 0, position 0, slot -1); ``lens`` [2S + 1] the query offsets ``cu_seqlens_q``
    [S + 1] (padding sequences: no new tokens) followed by the context lengths [S] (padding: 0);
    ``block_tables`` [S, width] each sequence's block table (other entries are never read).  ``draft_tokens``:
    a verify step's draft tokens, computed after each sequence's own (``ScheduledBatch.draft_tokens``)."""
    n, num_seqs = len(seqs), block_tables.shape[0]
    cu_q, context_lens = lens[:num_seqs + 1], lens[num_seqs + 1:]
    q_lens = np.asarray(num_new_tokens, dtype=np.int64)
    starts = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=n)
    cu_q[0] = 0
    np.cumsum(q_lens, out=cu_q[1:n + 1])
    total = int(cu_q[n])
    cu_q[n + 1:] = total
    context_lens[:n] = starts + q_lens
    context_lens[n:] = 0
    for i, seq in enumerate(seqs):
        block_tables[i, :len(seq.block_table)] = seq.block_table
        own = seq.token_ids[starts[i]:starts[i] + q_lens[i]]
        ints[0, cu_q[i]:cu_q[i + 1]] = own + draft_tokens[i] if draft_tokens is not None else own
    positions = np.arange(total) - np.repeat(cu_q[:n] - starts, q_lens)
    owner = np.repeat(np.arange(n), q_lens)
    ints[1, :total] = positions
    blocks = block_tables[owner, positions // block_size].astype(np.int64)
    ints[2, :total] = blocks * block_size + positions % block_size
    ints[:2, total:], ints[2, total:] = 0, -1


def fill_decode_inputs(seqs: list[Sequence], block_size: int, ints: np.ndarray, context_lens: np.ndarray,
                       block_tables: np.ndarray) -> None:
    """The host side of a decode step, in a few numpy calls for the whole batch (no per-sequence loop):
    ``ints`` [>=3, b] gets each sequence's last token, its position and the cache slot it stores into,
    ``context_lens`` [b] its context length, ``block_tables`` [b, width] its block table.  Rows past
    ``len(seqs)`` are padding: token 0 at position 0, slot -1 (store nothing), context 1 over block 0 (the
    buffers are reused, so every padding field is written).  Entries of ``block_tables`` past a sequence's
    blocks are left as they were (the kernels never read them).  A sequence whose last token is pending
    (overlapped execution) gets its last known token here; the replay puts the pending one in its place."""
    n, b = len(seqs), context_lens.shape[0]
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=n)
    num_blocks = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=n)
    flat = np.fromiter(itertools.chain.from_iterable(s.block_table for s in seqs), dtype=np.int32,
                       count=int(num_blocks.sum()))
    starts = np.cumsum(num_blocks) - num_blocks
    block_tables[np.repeat(np.arange(n), num_blocks), np.arange(flat.size) - np.repeat(starts, num_blocks)] = flat
    last = lengths - 1
    ints[0, :n] = np.fromiter((s.token_ids[-1] for s in seqs), dtype=np.int64, count=n)
    ints[1, :n] = last
    ints[2, :n] = flat[starts + last // block_size].astype(np.int64) * block_size + last % block_size
    context_lens[:n] = lengths
    ints[:2, n:b], ints[2, n:b], context_lens[n:b], block_tables[n:b, 0] = 0, -1, 1, 0


class PinnedRing:
    """A few sets of pinned host buffers, handed out in turn.  Allocating pinned memory every step is slow
    for the host; a set comes round again only after the copies recorded on its event have run (with a few
    sets and at most two steps in flight, long since)."""

    def __init__(self, slots: int, *specs: tuple[int, torch.dtype]):
        self.sets = [([torch.zeros(n, dtype=dtype, pin_memory=True) for n, dtype in specs], torch.cuda.Event())
                     for _ in range(slots)]
        self.index = 0

    def next(self) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        buffers, event = self.sets[self.index % len(self.sets)]
        self.index += 1
        event.synchronize()  # an event never recorded returns at once
        return buffers, event


class DecodeGraphs:
    """The captured decode graphs of one model, with their static input and output buffers."""

    def __init__(self, model, max_num_seqs: int, max_model_len: int, block_size: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.model, self.block_size, self.max_model_len, self.device = model, block_size, max_model_len, device
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        top, width = self.batch_sizes[-1], cdiv(max_model_len, block_size)
        self.ints = torch.zeros(4, top, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.prev_rows = self.ints.unbind(0)
        self.slot_mapping.fill_(-1)
        self.context_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(top, width, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(top + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(top, hidden_size, dtype=dtype, device=device)
        # pinned staging of each step's inputs: ints, context lengths, block tables
        self.input_ring = PinnedRing(4, (4 * top, torch.int64), (top, torch.int32), (top * width, torch.int32))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def metadata(self, b: int) -> AttentionMetadata:
        """The attention metadata of bucket ``b``: views of the static buffers."""
        return AttentionMetadata(
            is_prefill=False, cu_seqlens_q=self.cu_seqlens_q[:b + 1], context_lens=self.context_lens[:b],
            slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b], max_seqlen_q=1,
            max_seqlen_k=self.max_model_len)

    @torch.inference_mode()
    def capture(self, pool=None):
        """Capture every bucket, largest first, into ``pool`` (None: a new one); returns the pool."""
        for b in reversed(self.batch_sizes):
            meta = self.metadata(b)
            ids, pos = self.input_ids[:b], self.positions[:b]
            self.hidden[:b] = self.model(ids, pos, meta)  # warm this shape (and compile it)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.hidden[:b] = self.model(ids, pos, meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        return pool

    def replay(self, seqs: list[Sequence], prev_tokens: torch.Tensor | None = None,
               prev_rows: np.ndarray | None = None) -> torch.Tensor:
        """Copy this step's inputs into the static buffers, replay the smallest graph that fits; returns the
        hidden states [len(seqs), hidden].

        With ``prev_tokens`` (overlapped execution): sequence i's input token is ``prev_tokens[prev_rows[i]]``
        where ``prev_rows[i] >= 0``, read on the GPU (the previous launch's sampled tokens)."""
        n = len(seqs)
        b = next(size for size in self.batch_sizes if size >= n)
        (h_ints, h_context_lens, h_tables), event = self.input_ring.next()
        h_ints, h_context_lens = h_ints[:4 * b].view(4, b), h_context_lens[:b]
        h_tables = h_tables[:b * self.block_tables.shape[1]].view(b, -1)
        ints = h_ints.numpy()
        fill_decode_inputs(seqs, self.block_size, ints, h_context_lens.numpy(), h_tables.numpy())
        if prev_tokens is not None:
            ints[3, :n] = prev_rows
            ints[3, n:b] = -1
            self.ints[:, :b].copy_(h_ints, non_blocking=True)
            rows = self.prev_rows[:b]
            from_prev = prev_tokens[rows.clamp(0, prev_tokens.numel() - 1)]
            self.input_ids[:b] = torch.where(rows >= 0, from_prev, self.input_ids[:b])
        else:
            self.ints[:3, :b].copy_(h_ints[:3], non_blocking=True)
        self.context_lens[:b].copy_(h_context_lens, non_blocking=True)
        self.block_tables[:b].copy_(h_tables, non_blocking=True)
        event.record()
        self.graphs[b].replay()
        return self.hidden[:n]


class PrefillGraphs:
    """The captured prefill steps of one model (see the module's docstring), with their static buffers.

    On a CPU (tests) nothing is captured: ``run`` computes the same padded step eagerly."""

    def __init__(self, model, max_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model, self.block_size, self.max_model_len, self.device = model, block_size, max_model_len, device
        self.token_sizes = graph_token_sizes(max_tokens)
        self.max_seqs = min(max_num_seqs, PREFILL_GRAPH_MAX_SEQS)
        top, seqs, width = self.token_sizes[-1], self.max_seqs, cdiv(max_model_len, block_size)
        self.ints = torch.zeros(3, top, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.ints.unbind(0)
        self.slot_mapping.fill_(-1)
        self.lens = torch.zeros(2 * seqs + 1, dtype=torch.int32, device=device)
        self.cu_seqlens_q, self.context_lens = self.lens[:seqs + 1], self.lens[seqs + 1:]
        self.block_tables = torch.zeros(seqs, width, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(top, hidden_size, dtype=dtype, device=device)
        staging = (3 * top, torch.int64), (2 * seqs + 1, torch.int32), (seqs * width, torch.int32)
        self.input_ring = PinnedRing(4, *staging) if device.type == "cuda" else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def fits(self, num_seqs: int, num_tokens: int) -> bool:
        return num_seqs <= self.max_seqs and num_tokens <= self.token_sizes[-1]

    def metadata(self, t: int) -> AttentionMetadata:
        """The attention metadata of bucket ``t``: every sequence slot, at most ``t`` new tokens each."""
        return AttentionMetadata(
            is_prefill=True, cu_seqlens_q=self.cu_seqlens_q, context_lens=self.context_lens,
            slot_mapping=self.slot_mapping[:t], block_tables=self.block_tables, max_seqlen_q=t,
            max_seqlen_k=self.max_model_len)

    def forward(self, t: int) -> None:
        self.hidden[:t] = self.model(self.input_ids[:t], self.positions[:t], self.metadata(t))

    @torch.inference_mode()
    def capture(self, pool=None):
        """Capture every bucket, largest first, into ``pool`` (None: a new one); returns the pool.  The
        buffers hold padding only (no tokens, no context, slots -1), so capturing stores nothing."""
        for t in reversed(self.token_sizes):
            self.forward(t)  # warm this shape (and compile it)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.forward(t)
            pool = graph.pool()
            self.graphs[t] = graph
        torch.cuda.synchronize(self.device)
        return pool

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Copy the step's inputs into the static buffers, replay the smallest graph that holds them (on a
        CPU: compute it); returns the hidden states of the step's tokens [num_tokens, hidden]."""
        n = sum(batch.num_new_tokens)
        t = next(size for size in self.token_sizes if size >= n)
        if self.input_ring is None:
            h_ints, h_lens, h_tables = self.ints[:, :t], self.lens, self.block_tables
        else:
            (h_ints, h_lens, h_tables), event = self.input_ring.next()
            h_ints, h_tables = h_ints[:3 * t].view(3, t), h_tables.view(self.max_seqs, -1)
        fill_prefill_inputs(batch.seqs, batch.num_new_tokens, self.block_size, h_ints.numpy(), h_lens.numpy(),
                            h_tables.numpy(), batch.draft_tokens)
        if self.input_ring is not None:
            self.ints[:, :t].copy_(h_ints, non_blocking=True)
            self.lens.copy_(h_lens, non_blocking=True)
            self.block_tables.copy_(h_tables, non_blocking=True)
            event.record()
        if t in self.graphs:
            self.graphs[t].replay()
        else:
            self.forward(t)
        return self.hidden[:n]
