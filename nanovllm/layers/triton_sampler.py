"""A fused sampling kernel: temperature + Gumbel-max in one pass over the logits.

``argmax(logits / T + G)`` with ``G`` standard Gumbel noise is a draw from ``softmax(logits / T)`` (the
Gumbel-max trick; ``-log(E)`` for ``E ~ Exponential(1)`` is Gumbel, so this is the exponential race of
``sampler.py`` in log space).  One kernel reads each row once, makes its noise with Philox from a per-row
seed (``column_uniforms``: four columns per Philox call), and keeps a running max: no softmax, no
probability tensor, no second pass over the logits.  When there are few rows, each row is cut into column
ranges run by separate programs, and a tiny second kernel keeps the best of their winners.  Rows with
temperature 0 take the plain argmax.  Top-k/top-p rows are not handled here (the engine falls back to
``sampler.sample`` for batches that use them).

Row seeds make it reproducible: a seeded request's seed for each step depends only on its own seed and
how many tokens it has generated, never on the rest of the batch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # only the Triton modules need triton; the engine then samples with sampler.py
    raise ImportError("nanovllm.layers.triton_sampler needs the `triton` package (pip install triton, on Linux); "
                      "without it the engine samples with nanovllm.layers.sampler") from exc

from nanovllm.triton_pdl import pdl_options, pdl_wait
from nanovllm.triton_utils import num_sms
from nanovllm.utils import cdiv


@triton.jit
def column_uniforms(seed, start, BLOCK: tl.constexpr):
    """Uniform noise in (0, 1) for the columns ``start .. start + BLOCK - 1`` of a row (``start`` and ``BLOCK``
    multiples of 4).  Philox is a counter-based generator: its call for counter ``c`` gives four numbers,
    the noise of columns 4c .. 4c + 3, so a column's noise depends only on (seed, column)."""
    r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    # [r0[0], r1[0], r2[0], r3[0], r0[1], ...]: column start + 4 i + j gets r_j[i]
    return tl.random.uint_to_uniform_float(tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3)))


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2: on a GPU the hardware's approximate instruction (one op; the noise needs no more precision), in
    the interpreter the exact one."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


LN2 = tl.constexpr(0.6931471805599453)  # ln(2); a constexpr, so the kernels may read it


@triton.jit(do_not_specialize=["stride_row", "vocab", "chunk", "num_chunks"])  # one compile for every batch
def _gumbel_argmax_kernel(logits_ptr, stride_row, temps_ptr, seeds_ptr, out_ptr, best_val_ptr, best_idx_ptr,
                          vocab, chunk, num_chunks, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                          FAST_LOG: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0)
    part = tl.program_id(1)  # this program's share of the row: columns [part * chunk, (part + 1) * chunk)
    temp = tl.load(temps_ptr + row).to(tl.float32)
    seed = tl.load(seeds_ptr + row).to(tl.int64)  # integers, possibly staged as float64 (exact below 2**53)
    greedy = temp == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, vocab)
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 0, tl.int32) + lo
    base = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hi
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        if not greedy:  # Gumbel noise -ln(-ln u), with ln x = ln(2) log2(x)
            u = column_uniforms(seed, start, BLOCK)
            e = -LN2 * _log2(u + 1e-20, FAST_LOG)  # -ln u: Exponential(1)
            x = x - LN2 * _log2(e + 1e-20, FAST_LOG)
        better = x > best_val  # strict: the lowest index wins ties within a lane
        best_val = tl.where(better, x, best_val)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best_val, 0)
    idx = tl.min(tl.where(best_val == top, best_idx, vocab), 0)  # lowest index among equal maxima
    if SINGLE:
        tl.store(out_ptr + row, idx.to(tl.int64))
    else:
        tl.store(best_val_ptr + row * num_chunks + part, top)
        tl.store(best_idx_ptr + row * num_chunks + part, idx)


@triton.jit(do_not_specialize=["vocab", "num_chunks"])
def _argmax_of_parts_kernel(best_val_ptr, best_idx_ptr, out_ptr, vocab, num_chunks, BLOCK_C: tl.constexpr,
                            PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < num_chunks
    val = tl.load(best_val_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    idx = tl.load(best_idx_ptr + row * num_chunks + offs, mask=mask, other=vocab)
    top = tl.max(val, 0)
    tl.store(out_ptr + row, tl.min(tl.where(val == top, idx, vocab), 0).to(tl.int64))


MAX_CHUNKS = 256  # a fixed block for the merge kernel: one compiled version whatever the batch


def whole_row_batch(device: torch.device) -> int:
    """From this many rows on, one program per row already fills the GPU (about four per SM)."""
    return 4 * num_sms(device)


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  block: int = 2048, num_chunks: int | None = None) -> torch.Tensor:
    """logits: [S, V] (any float dtype, last dim contiguous); temperatures: [S] float32 or float64 (0 =
    greedy); seeds: [S] integer Philox seeds (int64, or float64 holding integers).  Returns [S] int64 token
    ids.

    A few rows would leave most of the GPU idle, so each row is cut into ``num_chunks`` column ranges
    (default: enough programs for about four per SM) whose winners a second small kernel compares.  The
    result does not depend on the cut: the noise of a column depends only on the row's seed."""
    assert logits.stride(-1) == 1
    assert block >= 4 and block & (block - 1) == 0, "block: a power of two >= 4"
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    tiles = cdiv(vocab, block)
    if num_chunks is None:
        num_chunks = cdiv(whole_row_batch(logits.device), rows)
    num_chunks = max(1, min(int(num_chunks), tiles, MAX_CHUNKS))
    chunk = cdiv(tiles, num_chunks) * block  # whole tiles per chunk
    num_chunks = cdiv(vocab, chunk)
    single = num_chunks == 1
    if single:
        best_val = best_idx = out  # unused
    else:
        best_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
        best_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(rows, num_chunks)](logits, logits.stride(0), temperatures, seeds, out, best_val,
                                              best_idx, vocab, chunk, num_chunks, BLOCK=block, SINGLE=single,
                                              FAST_LOG=logits.is_cuda, num_warps=8 if block >= 1024 else 4,
                                              **pdl_options(logits.device))
    if not single:
        _argmax_of_parts_kernel[(rows,)](best_val, best_idx, out, vocab, num_chunks, BLOCK_C=MAX_CHUNKS,
                                         num_warps=1, **pdl_options(logits.device))
    return out
