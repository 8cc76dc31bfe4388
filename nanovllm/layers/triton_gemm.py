"""A Triton GEMM for the skinny matrix products of decode: ``y = x @ W.T`` with few rows in ``x``.

In a decode step every linear layer multiplies a handful of rows (one per running sequence) by a weight
matrix that is read once from memory: the work is bound by that read, and at these sizes (4-12 MB per
matrix for Qwen3-0.6B) by how quickly the read ramps up.  Each program computes a ``BLOCK_M x BLOCK_N``
tile of ``y`` from a stripe of ``BLOCK_N`` weight rows; narrow stripes make enough programs to keep every
SM's loads in flight.  cuBLAS timed as fast for the plain products (figures/data/kernel_measurements.md);
what the kernel is for is the fusion.

``act="silu_mul"`` folds SwiGLU's activation into the merged gate-up projection: each program computes
matching column tiles of the gate and the up projection, rounds both as the GEMM would store them, and
writes ``silu(gate) * up`` (float32, rounded once, as the compiled ``silu_and_mul`` does).  The MLP's
activation then needs no kernel of its own, and the ``[M, 2 * intermediate]`` buffer is never written.

The engine uses it on CUDA for decode batches (see ``use_for``); prefill stays with cuBLAS, which is
faster once there are hundreds of rows.  The tests compare it with ``torch`` in the Triton interpreter.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # only this module (and the attention kernels) need triton
    raise ImportError("nanovllm.layers.triton_gemm needs the `triton` package (pip install triton)") from exc

from nanovllm.layers.linear import SplitK  # noqa: E402
from nanovllm.triton_pdl import pdl_options, pdl_wait  # noqa: E402
from nanovllm.triton_utils import dot_precision, launch_fitting_stages  # noqa: E402

ACTS = {None: 0, "silu_mul": 1}


@triton.jit
def _load_k_tile(rows, k, row_mask, K, EVEN_K: tl.constexpr):
    """Columns ``k`` of the rows at ``rows`` ([R, 1] pointers), zeros for masked rows (and, unless ``EVEN_K``,
    past ``K``)."""
    if EVEN_K:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (k < K)[None, :]
    return tl.load(rows + k[None, :], mask=mask, other=0.0)


@triton.jit
def _tile_rows(x_ptr, w_ptr, M, N, stride_xm, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's output tile (column stripe ``program_id(0)``, row block ``program_id(1)``): its row and
    column offsets and masks, and pointers to the starts of its rows of ``x`` and of ``w``."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    return offs_m, offs_n, offs_m < M, offs_n < N, x_rows, w_rows


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    # ACT == 1: y[:, j] = silu(g[:, j]) * u[:, j] with g = x @ W[j].T and u = x @ W[N + j].T (W holds 2N rows)
    pdl_wait(PDL)
    offs_m, offs_n, m_mask, n_mask, x_rows, w_rows = _tile_rows(x_ptr, w_ptr, M, N, stride_xm, stride_wn,
                                                                BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    up_rows = w_rows + N * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = _load_k_tile(x_rows, k, m_mask, K, EVEN_K)
        b = _load_k_tile(w_rows, k, n_mask, K, EVEN_K)
        acc += tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
        if ACT == 1:
            b_up = _load_k_tile(up_rows, k, n_mask, K, EVEN_K)
            acc_up += tl.dot(a, tl.trans(b_up), input_precision=DOT_PRECISION)
    out_ty = y_ptr.dtype.element_ty
    if ACT == 1:  # round the projections as the unfused GEMM stores them, then the activation in float32
        gate = acc.to(out_ty).to(tl.float32)
        up = acc_up.to(out_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(out_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# (up to this many rows: BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), the tile settings that timed
# fastest for the fused gate-up + SiLU-and-mul of Qwen3-0.6B (N 2 x 3072, K 1024) on an H100, 28 layers
# replayed from a CUDA graph (tests/gpu/gemm_check.py --triton): faster than cuBLAS + the activation kernel
# up to 128 rows, even with it at 192-256.  The per-layer times are in figures/data/kernel_measurements.md.
TILES = ((16, (16, 32, 128, 5, 4)), (32, (32, 64, 128, 4, 4)), (64, (64, 32, 128, 5, 4)),
         (128, (64, 64, 128, 4, 4)), (None, (128, 64, 64, 4, 8)))


# the same for a plain product (the qkv projection at decode sizes): TILES' 32-row tile is slow there
# (figures/data/fp8_words_h100.txt section 21), so 64-row tiles from 17 rows on
PLAIN_TILES = ((16, (16, 32, 128, 5, 4)), (None, (64, 32, 128, 5, 4)))


def default_config(m: int, tiles=TILES) -> dict:
    """Tile settings for ``m`` rows (``TILES``, or another such table)."""
    for rows, (bm, bn, bk, stages, warps) in tiles:
        if rows is None or m <= rows:
            return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps)
    raise AssertionError("unreachable")


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, act: str | None = None, out: torch.Tensor | None = None,
                **config) -> torch.Tensor:
    """``x @ w.T`` for a 2-D ``x`` ``[M, K]`` and a row-major ``w`` ``[N, K]``; with ``act="silu_mul"``,
    ``silu_and_mul(x @ w.T)`` (``w`` the merged gate-up matrix, gate rows first): ``[M, N / 2]``.
    ``config`` overrides the tile sizes (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``num_warps``,
    ``num_stages``)."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {list(ACTS)}, got {act!r}")
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x and w must be 2-D, got {tuple(x.shape)} and {tuple(w.shape)}")
    n, k = w.shape
    if act == "silu_mul":
        if n % 2:
            raise ValueError(f"act='silu_mul' needs an even number of weight rows (gate, then up), got {n}")
        n //= 2
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns, w has {k}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must have one dtype, got {x.dtype} and {w.dtype}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w must be contiguous along their last dimension")
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = default_config(m, TILES if act else PLAIN_TILES)
    cfg.update(config)
    if x.device.type == "cpu":  # the interpreter: no pipelining
        cfg["num_stages"] = 1
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    even_k = k % cfg["BLOCK_K"] == 0
    key = ("skinny_gemm", x.device.index, x.dtype, act, even_k,
           *(cfg[c] for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")))
    launch_fitting_stages(
        _skinny_gemm_kernel, grid, key, cfg["num_stages"],
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        ACT=ACTS[act], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        EVEN_K=even_k, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], **pdl_options(x.device),
    )
    return out


# -- the projections into the hidden size, split along K, summed by the residual add + RMSNorm -----------------
# o_proj and down_proj have few output columns (Qwen3-0.6B: 1024) and long rows (K 2048 and 3072), so a decode
# step's tile grid is a few column stripes with long K loops: the products wait on their loops and launches, not on
# bytes (figures/data/fp8_words_h100.txt sections 16 and 19).  Split along K, a product has S times the programs
# and 1/S of the loop each; its S partial products (fp32) go to the kernel that follows it anyway, the residual
# add + RMSNorm, which sums them first.  On an H100, 28 layers from a CUDA graph: 1.7 us a layer faster than cuBLAS
# + the compiled add-norm at 224 rows, 5.5 at 48 (tests/gpu/splitk_check.py, section 19).


@triton.jit
def _splitk_gemm_kernel(
    x_ptr, w_ptr, part_ptr, M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    # part[s, m, n] = x[m, ks] @ w[n, ks].T over split s's K_PER_SPLIT columns (a multiple of BLOCK_K)
    offs_m, offs_n, m_mask, n_mask, x_rows, w_rows = _tile_rows(x_ptr, w_ptr, M, N, stride_xm, stride_wn,
                                                                BLOCK_M, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_first = split * K_PER_SPLIT
    for k0 in range(k_first, k_first + K_PER_SPLIT, BLOCK_K):
        k = k0 + offs_k
        a = _load_k_tile(x_rows, k, m_mask, K, EVEN)
        b = _load_k_tile(w_rows, k, n_mask, K, EVEN)
        acc += tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    rows = (split * M + offs_m).to(tl.int64)
    tl.store(part_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_add_rms_norm_kernel(
    part_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, M, N, eps,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    # row m: y = the partials' sum, rounded as the GEMM stores it; h = y + residual, rounded (the new residual);
    # out = weight * rms_norm(h), rounded as add_rms_norm (nanovllm/layers/norm.py) rounds each step
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    y = tl.zeros([BLOCK_N], tl.float32)
    for s in tl.static_range(SPLITS):
        y += tl.load(part_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    dt = res_ptr.dtype.element_ty
    h = (y.to(dt).to(tl.float32) + tl.load(res_ptr + m * N + offs, mask=mask, other=0.0).to(tl.float32)).to(dt)
    tl.store(res_out_ptr + m * N + offs, h, mask=mask)
    hf = h.to(tl.float32)
    normed = (hf * tl.rsqrt(tl.sum(hf * hf, 0) / N + eps)).to(dt)
    out = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + m * N + offs, out.to(dt), mask=mask)


def splitk_config(m: int, k: int) -> dict:
    """Splits and tiles for ``m`` rows and ``k``-long rows, from tests/gpu/splitk_check.py's timings: about 512
    columns a split up to 64 rows (narrow tiles), about 1,024 above (wider tiles)."""
    few = m <= 64
    splits = 1
    while splits < 8 and k // (2 * splits) >= (512 if few else 1024):
        splits *= 2
    return dict(splits=splits, BLOCK_M=min(64, max(16, triton.next_power_of_2(m))), BLOCK_N=32 if few else 64,
                BLOCK_K=128, num_stages=3, num_warps=4)


def splitk_gemm(x: torch.Tensor, w: torch.Tensor, **config) -> SplitK:
    """``x @ w.T`` (``x`` [M, K], row-major ``w`` [N, K]) as ``SplitK`` partial sums along K.  ``config``
    overrides ``splitk_config``'s choice (``splits``, ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``num_stages``,
    ``num_warps``)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x [M, K] and w [N, K] must agree in K, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w must share a dtype and be contiguous along their last dimension")
    (m, k), n = x.shape, w.shape[0]
    cfg = splitk_config(m, k)
    cfg.update(config)
    splits, bk = cfg["splits"], cfg["BLOCK_K"]
    if x.device.type == "cpu":  # the interpreter: no pipelining
        cfg["num_stages"] = 1
    per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    parts = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    if m == 0:
        return SplitK(parts, x.dtype)
    even = per_split * splits == k
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), splits)
    key = ("splitk_gemm", x.device.index, x.dtype, even,
           *(cfg[c] for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")))
    launch_fitting_stages(
        _splitk_gemm_kernel, grid, key, cfg["num_stages"],
        x, w, parts, m, n, k, per_split, x.stride(0), w.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk, EVEN=even,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg["num_warps"], **pdl_options(x.device),
    )
    return SplitK(parts, x.dtype)


def sum_add_rms_norm(y: SplitK, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``add_rms_norm(y.total(), residual, weight, eps)`` in one kernel: returns (normed, new residual)."""
    s, m, n = y.parts.shape
    if residual.shape != (m, n) or residual.dtype != y.dtype or not residual.is_contiguous():
        raise ValueError(f"residual must be a contiguous [{m}, {n}] {y.dtype} tensor, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    out, res_out = torch.empty_like(residual), torch.empty_like(residual)
    if m:
        _sum_add_rms_norm_kernel[(m,)](y.parts, residual, weight, out, res_out, m, n, eps, SPLITS=s,
                                       BLOCK_N=triton.next_power_of_2(n), num_warps=4,
                                       **pdl_options(residual.device))
    return out, res_out
