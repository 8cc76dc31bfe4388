"""A fused sampling kernel: temperature + Gumbel-max in one pass over the logits.

``argmax(logits / T + G)`` with ``G`` standard Gumbel noise is a draw from ``softmax(logits / T)`` (the
Gumbel-max trick; ``-log(E)`` for ``E ~ Exponential(1)`` is Gumbel, so this is the exponential race of
``sampler.py`` in log space).  One kernel reads each row once, makes its noise with Philox from a per-row
seed (``tl.rand``), and keeps a running max: no softmax, no probability tensor, no second pass.  Rows with
temperature 0 take the plain argmax.  Top-k/top-p rows are not handled here (the engine falls back to
``sampler.sample`` for batches that use them).

Row seeds make it reproducible: a seeded request's seed for each step depends only on its own seed and
how many tokens it has generated, never on the rest of the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, stride_row, temps_ptr, seeds_ptr, out_ptr, vocab,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.load(temps_ptr + row)
    seed = tl.load(seeds_ptr + row)
    greedy = temp == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 0, tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        if not greedy:
            u = tl.rand(seed, cols)
            x = x - tl.log(-tl.log(u + 1e-20) + 1e-20)
        better = x > best_val  # strict: the lowest index wins ties within a lane
        best_val = tl.where(better, x, best_val)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best_val, 0)
    idx = tl.min(tl.where(best_val == top, best_idx, vocab), 0)  # lowest index among equal maxima
    tl.store(out_ptr + row, idx.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  block: int = 2048) -> torch.Tensor:
    """logits: [S, V] (any float dtype, last dim contiguous); temperatures: [S] float32 (0 = greedy);
    seeds: [S] int32 Philox seeds.  Returns [S] int64 token ids."""
    assert logits.stride(-1) == 1
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _gumbel_argmax_kernel[(rows,)](logits, logits.stride(0), temperatures, seeds, out, vocab,
                                       BLOCK=block, num_warps=8)
    return out
