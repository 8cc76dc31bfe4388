"""An experiment: FP8 decode attention written in Gluon (Triton's explicit-layout language), with every warp
reading its own tokens' K and V straight from global memory into the tensor-core operands' registers: no
shared memory in the loop at all.

Why: Nsight Compute found the Triton FP8 decode kernel bound by shared memory (``figures/data/fp8_words_h100.txt``
section 12: L1/shared 73 % busy, 28 % of its shared wavefronts bank conflicts), and Triton gives no say over
the layouts that cause them.  Here the layouts are chosen by hand:

* the dot over the head dimension does not care in which order the dimensions come, so K's bytes are loaded 16
  contiguous bytes a thread and *relabelled* (a reshape and a permute, which move nothing) into the mma.sync
  B operand; q is read with the same relabelling;
* the output's columns may come in any order too (the store puts them back), so V's bytes are loaded the same
  way and relabelled into the second product's B operand;
* each warp takes its own tokens of a tile (a split of the context within the program), keeping its own
  running maximum, sum and accumulator; the warps combine once, at the end.

Variants (``variant()``): tokens a warp, a register prefetch, two cp.async buffers, warps as splits of the
reduction kernel.  Head dims 64 and 128 (SmolLM2-135M's and Qwen3-0.6B's).  Not part of the package; the results so
far are in ``figures/data/fp8_words_h100.txt`` section 14.  On a GPU (checks against the Triton kernel, then times
both from CUDA graphs, then the seed benchmark with the fastest variant in the Triton kernel's place):

    PYTHONPATH=. python3 tests/gpu/gluon_decode.py --tokens 32,32x,16s2 --bench best [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from nanovllm.attention import triton_kernels as tk  # noqa: E402

# cp.async into shared memory: async_load from Triton 3.7, async_copy_global_to_shared in 3.6 (the GPU machine's)
async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# the Triton kernel's widening (``_e4m3_words_to_f16``), four bytes at a time
E4M3X4_TO_F16 = gl.constexpr("{ .reg .b16 a, b; mov.b32 {a, b}, $2; "
                             "cvt.rn.f16x2.e4m3x2 $0, a; cvt.rn.f16x2.e4m3x2 $1, b; }")


@gluon.jit
def _idx3(N0: gl.constexpr, N1: gl.constexpr, N2: gl.constexpr, L: gl.constexpr):
    """Index tensors [N0, 1, 1], [1, N1, 1], [1, 1, N2] of the rank-3 layout ``L``."""
    i0 = gl.arange(0, N0, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))
    i1 = gl.arange(0, N1, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))
    i2 = gl.arange(0, N2, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))
    return i0[:, None, None], i1[None, :, None], i2[None, None, :]


@gluon.jit
def _e4m3_to_f16(x):
    return gl.inline_asm_elementwise(E4M3X4_TO_F16, "=r,=r,r", [x], dtype=gl.float16, is_pure=True, pack=4)


@gluon.jit
def _kappa_to_d(kap):
    """The memory column of K's product column ``kap``: kap = j*16 + h*8 + tl*2 + p  ->  d = (j//4)*64 + tl*16 +
    (j%4)*4 + h*2 + p (the relabelling of K's bytes below, applied to q)."""
    j = kap // 16
    h = (kap // 8) % 2
    tl_ = (kap // 2) % 4
    p = kap % 2
    return (j // 4) * 64 + tl_ * 16 + (j % 4) * 4 + h * 2 + p


@gluon.jit
def _rows(bt_row, start, w, t, ctx, stride_cb, stride_cs, head_off, T: gl.constexpr, BLOCK_SIZE: gl.constexpr):
    """The cache offsets of the rows of warp ``w``'s tokens ``t`` [W, T, 1] (its T tokens: T // BLOCK_SIZE cache
    blocks, one block-table entry each, read once a thread rather than once a row), and which are in the context."""
    pos = start + w * T + t
    if T % BLOCK_SIZE == 0:
        first = (start + w * T) // BLOCK_SIZE  # [W, 1, 1]
        blk = gl.load(bt_row + first, mask=start + w * T < ctx, other=0)
        for i in gl.static_range(1, T // BLOCK_SIZE):
            bi = gl.load(bt_row + first + i, mask=start + w * T + i * BLOCK_SIZE < ctx, other=0)
            blk = gl.where(t // BLOCK_SIZE == i, bi, blk)
    else:
        blk = gl.load(bt_row + pos // BLOCK_SIZE, mask=pos < ctx, other=0)
    return blk.to(gl.int64) * stride_cb + (pos % BLOCK_SIZE).to(gl.int64) * stride_cs + head_off, pos < ctx


@gluon.jit
def _load_chunk(kc_ptr, vc_ptr, bt_row, start, lim, kw, kt, kd, vw, vt, vd, stride_cb, stride_cs, head_off,
                T: gl.constexpr, BLOCK_SIZE: gl.constexpr, D: gl.constexpr):
    """A chunk's K and V bytes (tokens from ``start``, those below ``lim``), each in its load layout."""
    row, ok = _rows(bt_row, start, kw, kt, lim, stride_cb, stride_cs, head_off, T, BLOCK_SIZE)
    kb = gl.load(kc_ptr + row + kd, mask=ok & (kd < D), other=0)
    vrow, vok = _rows(bt_row, start, vw, vt, lim, stride_cb, stride_cs, head_off, T, BLOCK_SIZE)
    vb = gl.load(vc_ptr + vrow + vd, mask=vok & (vd < D), other=0)
    return kb, vb


@gluon.jit
def _copy_chunk(k_dst, v_dst, kc_ptr, vc_ptr, bt_row, start, lim, kw, kt, kd, vw, vt, vd, stride_cb, stride_cs,
                head_off, T: gl.constexpr, BLOCK_SIZE: gl.constexpr, D: gl.constexpr):
    """A chunk's K and V bytes into shared memory by cp.async (zeros past ``lim``)."""
    row, ok = _rows(bt_row, start, kw, kt, lim, stride_cb, stride_cs, head_off, T, BLOCK_SIZE)
    vrow, vok = _rows(bt_row, start, vw, vt, lim, stride_cb, stride_cs, head_off, T, BLOCK_SIZE)
    async_load(k_dst, kc_ptr + row + kd, mask=ok & (kd < D))
    async_load(v_dst, vc_ptr + vrow + vd, mask=vok & (vd < D))


@gluon.jit
def _attend(kb, vb, q, m_i, l_i, acc, start, ctx, cw, ct, qk_scale, W: gl.constexpr, T: gl.constexpr,
            D: gl.constexpr, M: gl.constexpr, MMA: gl.constexpr):
    """One chunk: the warps' scores over their T tokens each, the online softmax, and P @ V into ``acc``."""
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    # K [W, T, d] -> [W, T, kappa] (d = j2*64 + tl*16 + jl*4 + h*2 + p -> kappa = j2*64 + jl*16 + h*8 + tl*2 + p)
    k = _e4m3_to_f16(kb)
    k = gl.reshape(k, [W, T, D // 64, 4, 4, 2, 2])
    k = gl.permute(k, [0, 1, 2, 4, 5, 3, 6])
    k = gl.reshape(k, [W, T, D])
    k = gl.convert_layout(gl.permute(k, [0, 2, 1]), B_OP)  # [W, kappa, T]
    s = mma_v2(q, k, gl.zeros([W, M, T], gl.float32, layout=MMA))
    s = gl.where(start + cw * T + ct < ctx, s * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 2))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a warp with no token yet
    alpha = gl.exp2(m_i - m_safe)
    p = gl.exp2(s - m_safe[:, :, None])
    l_i = l_i * alpha + gl.sum(p, 2)
    # V [W, T, e] -> [W, T, e'] (e = a*(D/8) + b -> e' = b*8 + a)
    v = _e4m3_to_f16(vb)
    v = gl.reshape(v, [W, T, 8, D // 8])
    v = gl.permute(v, [0, 1, 3, 2])
    v = gl.convert_layout(gl.reshape(v, [W, T, D]), B_OP)
    acc = mma_v2(gl.convert_layout(p.to(gl.float16), A_OP), v, acc * alpha[:, :, None])
    return m_new, l_i, acc


@gluon.jit
def _fp8_decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, ks_ptr, vs_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    qk_scale, num_heads, num_splits,
    stride_qb, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_btb,
    stride_ob, stride_oh,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr, W: gl.constexpr, T: gl.constexpr,
    MMA: gl.constexpr, K_LOAD: gl.constexpr, V_LOAD: gl.constexpr, SINGLE_SPLIT: gl.constexpr,
    PREFETCH: gl.constexpr = False, STAGES: gl.constexpr = 0, K_SMEM: gl.constexpr = None,
    V_SMEM: gl.constexpr = None, WARP_SPLITS: gl.constexpr = False,
):
    D: gl.constexpr = HEAD_DIM
    M: gl.constexpr = 16  # mma.sync rows: the GROUP query heads, padded
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    kvh = gl.program_id(0)
    seq = gl.program_id(1)
    split = gl.program_id(2)
    ctx = gl.load(ctx_ptr + seq)
    CHUNK: gl.constexpr = W * T  # tokens a program takes a step: T a warp
    tiles = gl.cdiv(ctx, CHUNK)
    per_split = gl.cdiv(tiles, num_splits)
    first = split * per_split * CHUNK
    last = gl.minimum(first + per_split * CHUNK, ctx)
    qk_scale = qk_scale * gl.load(ks_ptr + kvh)
    bt_row = bt_ptr + seq.to(gl.int64) * stride_btb
    head_off = kvh.to(gl.int64) * stride_ch

    # q, relabelled as K's columns are, [W, M, D] (every warp the same), float16 as the products take it
    qw, qg, qk_ = _idx3(W, M, D, A_OP)
    q_off = seq.to(gl.int64) * stride_qb + (kvh * GROUP + qg) * stride_qh + _kappa_to_d(qk_) + qw * 0
    q = gl.load(q_ptr + q_off, mask=(qg < GROUP) & (qw >= 0), other=0.0)
    q = gl.minimum(gl.maximum(q.to(gl.float32), -65504.0), 65504.0).to(gl.float16)

    kw, kt, kd = _idx3(W, T, D, K_LOAD)
    vw, vt, vd = _idx3(W, T, D, V_LOAD)
    cw, cg, ct = _idx3(W, M, T, MMA)

    m_i = gl.full([W, M], float("-inf"), gl.float32, layout=gl.SliceLayout(2, MMA))
    l_i = gl.zeros([W, M], gl.float32, layout=gl.SliceLayout(2, MMA))
    acc = gl.zeros([W, M, D], gl.float32, layout=MMA)
    if STAGES == 2:  # two chunks' buffers in shared memory, filled by cp.async; a thread reads back its own bytes
        k0 = gl.allocate_shared_memory(gl.uint8, [W, T, D], K_SMEM)
        v0 = gl.allocate_shared_memory(gl.uint8, [W, T, D], V_SMEM)
        k1 = gl.allocate_shared_memory(gl.uint8, [W, T, D], K_SMEM)
        v1 = gl.allocate_shared_memory(gl.uint8, [W, T, D], V_SMEM)
        _copy_chunk(k0, v0, kc_ptr, vc_ptr, bt_row, first, last, kw, kt, kd, vw, vt, vd, stride_cb, stride_cs,
                    head_off, T, BLOCK_SIZE, D)
        async_copy.commit_group()
        for start in range(first, last, 2 * CHUNK):
            _copy_chunk(k1, v1, kc_ptr, vc_ptr, bt_row, start + CHUNK, last, kw, kt, kd, vw, vt, vd, stride_cb,
                        stride_cs, head_off, T, BLOCK_SIZE, D)
            async_copy.commit_group()
            async_copy.wait_group(1)
            m_i, l_i, acc = _attend(k0.load(K_LOAD), v0.load(V_LOAD), q, m_i, l_i, acc, start, ctx, cw, ct,
                                    qk_scale, W, T, D, M, MMA)
            _copy_chunk(k0, v0, kc_ptr, vc_ptr, bt_row, start + 2 * CHUNK, last, kw, kt, kd, vw, vt, vd, stride_cb,
                        stride_cs, head_off, T, BLOCK_SIZE, D)
            async_copy.commit_group()
            async_copy.wait_group(1)
            if start + CHUNK < last:
                m_i, l_i, acc = _attend(k1.load(K_LOAD), v1.load(V_LOAD), q, m_i, l_i, acc, start + CHUNK, ctx, cw,
                                        ct, qk_scale, W, T, D, M, MMA)
        async_copy.wait_group(0)
    else:
        if PREFETCH:  # the first chunk's bytes before the loop; each step then reads the next chunk's first
            kb, vb = _load_chunk(kc_ptr, vc_ptr, bt_row, first, last, kw, kt, kd, vw, vt, vd, stride_cb, stride_cs,
                                 head_off, T, BLOCK_SIZE, D)
        for start in range(first, last, CHUNK):
            if PREFETCH:
                kb_next, vb_next = _load_chunk(kc_ptr, vc_ptr, bt_row, start + CHUNK, last, kw, kt, kd, vw, vt, vd,
                                               stride_cb, stride_cs, head_off, T, BLOCK_SIZE, D)
            else:
                kb, vb = _load_chunk(kc_ptr, vc_ptr, bt_row, start, last, kw, kt, kd, vw, vt, vd, stride_cb,
                                     stride_cs, head_off, T, BLOCK_SIZE, D)
            m_i, l_i, acc = _attend(kb, vb, q, m_i, l_i, acc, start, ctx, cw, ct, qk_scale, W, T, D, M, MMA)
            if PREFETCH:
                kb = kb_next
                vb = vb_next

    if WARP_SPLITS:  # every warp its own split of the reduction kernel's: no combining here
        has_w = l_i > 0  # [W, M]
        o_w = acc / gl.where(has_w, l_i, 1.0)[:, :, None] * gl.load(vs_ptr + kvh)
        ws, gs, es = _idx3(W, M, D, MMA)
        row_w = (seq.to(gl.int64) * num_heads + kvh * GROUP + gs) * (num_splits * W) + split * W + ws
        gl.store(mid_o_ptr + row_w * D + (es % 8) * (D // 8) + es // 8, o_w, mask=(gs < GROUP) & (es < D))
        wl = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, MMA)))[:, None]
        gl2 = gl.arange(0, M, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))[None, :]
        lse_w = gl.where(has_w, m_i + gl.log2(gl.where(has_w, l_i, 1.0)), float("-inf"))
        gl.store(mid_lse_ptr + (seq.to(gl.int64) * num_heads + kvh * GROUP + gl2) * (num_splits * W) + split * W + wl,
                 lse_w, mask=gl2 < GROUP)
        return
    # the warps' partial results, combined
    m_all = gl.max(m_i, 0)
    m_all = gl.where(m_all == float("-inf"), 0.0, m_all)  # an empty split
    wgt = gl.exp2(m_i - m_all[None, :])
    l_all = gl.sum((l_i * wgt)[:, :, None], 0)  # [M, 1] in SliceLayout(0, MMA), as o's rows
    o = gl.sum(acc * wgt[:, :, None], 0)  # [M, D'] in SliceLayout(0, MMA)
    has = l_all > 0
    o = o / gl.where(has, l_all, 1.0) * gl.load(vs_ptr + kvh)
    og = gl.arange(0, M, layout=gl.SliceLayout(1, gl.SliceLayout(0, MMA)))[:, None]
    oe = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(0, MMA)))[None, :]
    e = (oe % 8) * (D // 8) + oe // 8  # e' = b*8 + a -> e = a*(D/8) + b
    rows = (og < GROUP) & (oe < D)
    if SINGLE_SPLIT:
        gl.store(out_ptr + seq.to(gl.int64) * stride_ob + (kvh * GROUP + og) * stride_oh + e,
                 o.to(out_ptr.dtype.element_ty), mask=rows)
    else:  # mid: [B, H, S(, D)], base-2 log-sum-exp, as the Triton kernel's reduction reads them
        row = (seq.to(gl.int64) * num_heads + kvh * GROUP + og) * num_splits + split  # [M, 1]
        m_rows = gl.max(m_i[:, :, None], 0)  # m_all again, [M, 1] as o's rows
        lse = gl.where(has, m_rows + gl.log2(gl.where(has, l_all, 1.0)), float("-inf"))
        gl.store(mid_lse_ptr + row, lse, mask=og < GROUP)
        gl.store(mid_o_ptr + row * D + e, o, mask=rows)


def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


def layouts(W: int, T: int, D: int = 128, stages: int = 0):
    """The mma layout and the two load layouts (bases over [warp's chunk w, token t, column d])."""
    assert T in (16, 32, 64) and D in (64, 128), (T, D)
    v_regs = [[0, 0, 1 << i] for i in range(_log2(D // 8))]  # a thread's D/8 contiguous bytes of a row of V
    warps = [[1 << i, 0, 0] for i in range(_log2(W))]
    t_regs = [[0, 8 << i, 0] for i in range(_log2(T // 8))]
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    k_load = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8]] + ([[0, 0, 64]] if D == 128 else []) + t_regs,
        lane_bases=[[0, 0, 16], [0, 0, 32], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=warps, block_bases=[], shape=[W, T, D])
    v_load = gl.DistributedLinearLayout(
        reg_bases=v_regs + [[0, 1, 0]] + t_regs,
        lane_bases=[[0, 2, 0], [0, 4, 0]] + [[0, 0, (D // 8) << i] for i in range(3)],
        warp_bases=warps, block_bases=[], shape=[W, T, D])
    if stages:  # a chunk's buffer, thread-private: offsets in the order of the load layout's bits (a thread's
        # contiguous bytes, then its lanes, its other registers, its warps), so a warp's read of one of its vectors is
        # contiguous bytes, free of bank conflicts
        assert stages == 2, "two buffers only"

        def buffer(load, vector_bytes):
            vec = [b for b in load.reg_bases if b[1] == 0 and b[2] < vector_bytes]
            rest = [b for b in load.reg_bases if b not in vec]
            return gl.SharedLinearLayout(offset_bases=vec + load.lane_bases + rest + load.warp_bases)
        return mma, k_load, v_load, buffer(k_load, 16), buffer(v_load, D // 8)
    return mma, k_load, v_load


def gluon_fp8_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale, out=None,
                     warps: int = 4, tokens: int = 32, num_splits: int = 1,
                     prefetch: bool = False, stages: int = 0, maxnreg: int | None = None,
                     warp_splits: bool = False):
    """Decode attention over an FP8 cache [num_blocks, block_size, Hkv, D]: q [B, H, D] -> [B, H, D], D 64 or 128;
    ``num_splits`` programs a sequence's KV head, merged by the Triton backend's reduction kernel."""
    B, H, D = q.shape
    nb, bs, hkv, d = k_cache.shape
    assert D == d and D in (64, 128) and H % hkv == 0 and H // hkv <= 16
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out
    if stages:
        mma, k_load, v_load, k_smem, v_smem = layouts(warps, tokens, D, stages)
    else:
        (mma, k_load, v_load), k_smem, v_smem = layouts(warps, tokens, D), None, None
    single = num_splits == 1 and not warp_splits
    parts = num_splits * (warps if warp_splits else 1)  # the reduction kernel's splits
    if single:
        mid_o = mid_lse = out
    else:
        mid_o = torch.empty((B, H, parts, D), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((B, H, parts), dtype=torch.float32, device=q.device)
    _fp8_decode_kernel[(hkv, B, num_splits)](
        q, k_cache.view(torch.uint8), v_cache.view(torch.uint8), block_tables, context_lens, k_scale, v_scale, out,
        mid_o, mid_lse, scale * 1.4426950408889634, H, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=H // hkv, HEAD_DIM=D, BLOCK_SIZE=bs, W=warps, T=tokens, MMA=mma, K_LOAD=k_load, V_LOAD=v_load,
        SINGLE_SPLIT=single, PREFETCH=prefetch, STAGES=stages, K_SMEM=k_smem, V_SMEM=v_smem, WARP_SPLITS=warp_splits,
        num_warps=warps, **({"maxnreg": maxnreg} if maxnreg else {}))
    if not single:
        tk._decode_reduce_kernel[(B, H)](mid_o, mid_lse, out, H, parts, out.stride(0), out.stride(1),
                                         out.stride(2), HEAD_DIM=D, BLOCK_D=D, BLOCK_S=tk.next_pow2(parts),
                                         num_warps=4)
    return out


def variant(name: str) -> dict:
    """"32": 32 tokens a warp; "16p": 16, the next chunk prefetched into registers; "16s2": 16, two chunks'
    buffers in shared memory filled by cp.async; "w2": 2 warps a program (else 4); "r128": at most 128 registers a
    thread; "x": each warp a split of the reduction kernel's (no combining in the kernel)."""
    m = re.fullmatch(r"(\d+)(p?)(?:s(\d))?(?:w(\d))?(?:r(\d+))?(x?)", name)
    assert m, name
    return dict(tokens=int(m[1]), prefetch=bool(m[2]), stages=int(m[3] or 0), warps=int(m[4] or 4),
                maxnreg=int(m[5]) if m[5] else None, warp_splits=bool(m[6]))


def bench(out, tokens=("32",)):
    """The seed benchmark: auto, fp8 (the Triton kernel), then fp8 with this kernel in its place for each T."""
    from decode_sweep import package_decode_replaced

    from nanovllm import bench as nb

    rates = {}
    for name, tok in [("auto", None), ("fp8", None)] + [(f"fp8 gluon T={t}", t) for t in tokens]:
        def make(triton_decode, tok=tok):
            def decode(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None, k_scale=None,
                       v_scale=None, **kw):
                if tok is None or k_scale is None or q.shape[-1] not in (64, 128) or q.dtype != torch.bfloat16:
                    return triton_decode(q, k_cache, v_cache, block_tables, context_lens, scale,
                                         num_splits=num_splits, k_scale=k_scale, v_scale=v_scale, **kw)
                bs = k_cache.shape[1]
                splits = num_splits or tk.pick_num_splits(q.shape[0], k_cache.shape[2], block_tables.shape[1] * bs,
                                                          tk.num_sms(q.device),
                                                          variant(tok)["warps"] * variant(tok)["tokens"])
                return gluon_fp8_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                        num_splits=splits, **variant(tok))
            return decode

        with package_decode_replaced(make):
            [r] = nb.main(["--engine", "nanovllm", "--kv-cache-dtype", "auto" if name == "auto" else "fp8",
                           "--json", os.path.join(out or "/tmp", "gluon_bench.jsonl")])
            rates[name] = r.tok_per_s
        print(f"  seed benchmark, {name}: {rates[name]:.0f} tok/s", flush=True)
    return rates


def main():
    from decode_sweep import BS, HKV, D, H, batch_at_step, graph_inputs, scattered_fp8_cache
    from gemm_check import LAYERS, chain, graph_us

    from nanovllm.attention import triton_kernels as tk
    from nanovllm.bench import seed_workload

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", default="200,600,900")
    ap.add_argument("--tokens", default="16,32")
    ap.add_argument("--bench", default="", help="also the seed benchmark with this kernel, for these T (e.g. 32)")
    args = ap.parse_args()
    w = seed_workload()
    eng = dict(f16_dot=True, fp8_words=tk.TritonBackend.fp8_words, fp8_words_k=tk.TritonBackend.fp8_words_k)
    lines = []

    def say(s):
        print(s, flush=True)
        lines.append(s)

    # correctness on a small irregular batch first: scattered blocks, lengths 1..600; Qwen3-0.6B's heads and the
    # embedded SmolLM2-135M's (9 query heads, 3 KV heads, head_dim 64)
    for h, hkv, d in ((H, HKV, D), (9, 3, 64)):
        g = torch.Generator(device="cuda").manual_seed(0)
        lens = torch.tensor([1, 5, 16, 17, 100, 127, 128, 129, 300, 511, 600, 33], dtype=torch.int32, device="cuda")
        k, v, tables = scattered_fp8_cache(lens.tolist(), BS, hkv, d, g)
        tables = tables.cuda()
        q = torch.randn(len(lens), h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        ks = torch.rand(hkv, device="cuda", generator=g) + 0.5
        vs = torch.rand(hkv, device="cuda", generator=g) + 0.5
        ref = tk.paged_decode_attention(q, k, v, tables, lens, d ** -0.5, k_scale=ks, v_scale=vs, **eng).float()
        for tok in args.tokens.split(","):
            for sp in (1, 3):
                try:
                    got = gluon_fp8_decode(q, k, v, tables, lens, d ** -0.5, ks, vs, num_splits=sp, **variant(tok))
                    err = f"{(got.float() - ref).abs().max().item():.4g}"
                    ok = float(err) < 2e-2
                except Exception as e:  # noqa: BLE001
                    err, ok = f"{type(e).__name__} {str(e)[:200]}", False
                say(f"check heads {h}/{hkv} d {d} T={tok} splits {sp}: max |gluon - triton| = {err} "
                    f"{'PASS' if ok else 'FAIL'}")

    ones = torch.ones(HKV, device="cuda")
    total = dict.fromkeys(args.tokens.split(","), 0.0)  # each variant's time over the steps
    for step in map(int, args.steps.split(",")):
        ctx = batch_at_step(w, step)
        nb, tables, lens, q = graph_inputs(ctx)
        k = torch.randn(nb * LAYERS + 8, BS, HKV, D, device="cuda").to(torch.float8_e4m3fn)
        v = torch.randn(nb * LAYERS + 8, BS, HKV, D, device="cuda").to(torch.float8_e4m3fn)
        nbytes = sum(ctx) * HKV * D * 2

        def triton_call(t, q=q, k=k, v=v, lens=lens):
            tk.paged_decode_attention(q, k, v, t, lens, D ** -0.5, k_scale=ones, v_scale=ones, **eng)

        def gluon_call(t, tok, q=q, k=k, v=v, lens=lens):
            gluon_fp8_decode(q, k, v, t, lens, D ** -0.5, ones, ones, **variant(tok))

        res = []
        for name, fn in [("triton (the engine's launch)", triton_call)] + [
                (f"gluon T={tok}", functools.partial(gluon_call, tok=tok)) for tok in args.tokens.split(",")
                ] + [("triton again", triton_call)]:
            try:
                us = graph_us(chain(tables, fn))
                res.append(f"{name} {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s)")
                if name.startswith("gluon"):
                    total[name.split("=")[1]] += us
            except Exception as e:  # noqa: BLE001
                res.append(f"{name}: {type(e).__name__} {str(e)[:200]}")
                if name.startswith("gluon"):
                    total[name.split("=")[1]] = float("inf")
        say(f"step {step} batch {len(ctx)}: " + "; ".join(res))
        del k, v
        torch.cuda.empty_cache()
    if args.bench:  # "best": the variant fastest over the steps
        picks = [min(total, key=total.get)] if args.bench == "best" else args.bench.split(",")
        for name, r in bench(args.out, picks).items():
            say(f"seed benchmark, {name}: {r:.0f} tok/s")
    if args.out:
        with open(os.path.join(args.out, "gluon_decode.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
