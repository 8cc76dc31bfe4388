"""Paged-attention kernels in Triton, and the backend that uses them.

They compute exactly what ``torch_ref.py`` computes, on the same KV-cache layout
(``[num_blocks, block_size, num_kv_heads, head_dim]``, see ``base.py``):

* ``store_kvcache``: scatter the step's new K/V into their cache slots (one program per token).
* ``paged_decode_attention``: one query per sequence, split-KV ("flash-decoding"): every program
  handles all query heads of one KV head (the GQA group, padded to 16 rows so ``tl.dot`` applies)
  over its share of the sequence's tokens, then a small kernel merges the splits by log-sum-exp.
* ``flat_decode_attention``: the same over an FP8 cache as one balanced pass: as many programs as the GPU holds,
  each an equal run of the batch's tiles whatever sequences they belong to (``TritonBackend.fp8_flat``, off until
  timed on a GPU).
* ``paged_prefill_attention``: varlen causal attention of each sequence's last ``q_len`` tokens over
  its whole context (cached prefix + the new tokens, already stored), flash-attention style.  The
  query heads of one GQA group are packed into the rows of one tile, so K/V are read once per group.

With ``kv_cache_dtype="fp8"`` the cache holds e4m3 values and each KV head has a float32 scale for K and one
for V (``fp8.py``): the stores divide by it, clamp to +-448 and round (``_to_e4m3``); the attention kernels
load e4m3, widen it to the query's dtype and fold the scales in where they cost nothing (K's into the
softmax scale, V's into the output), since a program handles one KV head.

Every kernel walks the cache token by token through the block table (slot = block_id * block_size +
offset), so a tile of ``BLOCK_N`` tokens may span several small blocks.  No wrapper reads device
memory on the host, so decode and prefill launches can be captured in CUDA graphs (the grid depends
only on shapes and on Python ints the caller passes).

Importing this module needs ``triton``; the rest of ``nanovllm`` does not.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # only this module needs triton
    raise ImportError(
        "nanovllm.attention.triton_kernels needs the `triton` package (pip install triton); "
        "use the 'torch' attention backend where triton is unavailable"
    ) from exc

from nanovllm.attention.base import AttentionBackend, AttentionMetadata
from nanovllm.attention.fp8 import is_fp8
from nanovllm.attention.torch_ref import varlen_causal_attention
from nanovllm.triton_pdl import pdl_options, pdl_wait
from nanovllm.triton_utils import (
    dot_precision,
    launch_fitting_stages,
    max_shared_memory,
    next_pow2,
    num_sms,
)
from nanovllm.utils import cdiv

LOG2E = 1.4426950408889634

__all__ = [
    "store_kvcache",
    "qkv_rope_store",
    "paged_decode_attention",
    "flat_decode_attention",
    "paged_prefill_attention",
    "pick_num_splits",
    "TritonBackend",
]


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale=None, v_scale=None) -> bool:
    """Check the caches' layout; return whether they are FP8 (then with their [Hkv] float32 scales)."""
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches: [num_blocks, block_size, Hkv, D]"
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share strides"
    fp8 = is_fp8(k_cache)
    if fp8:
        assert k_scale is not None and v_scale is not None, "an FP8 cache needs k_scale and v_scale"
        assert k_scale.shape == v_scale.shape == (k_cache.shape[2],) and k_scale.dtype == torch.float32
    return fp8


# ----------------------------------------------------------------------------------------------
# FP8: float32 -> e4m3, exactly
# ----------------------------------------------------------------------------------------------


@triton.jit
def _to_e4m3(x, scale):
    """``x / scale`` (float32; ``scale`` a power of two, so exact) clamped to +-448 and rounded to the nearest
    e4m3 value, ties to even: a float32 that e4m3 represents exactly, so the final cast rounds nothing.
    (The rounding is done on the bits because Triton's interpreter casts halfway values wrongly; on a GPU
    these few integer operations cost nothing next to the store.)"""
    x = x / scale
    ax = tl.minimum(tl.abs(x), 448.0)  # FP8_MAX
    bits = ax.to(tl.int32, bitcast=True)
    exp = bits >> 23  # biased float32 exponent
    sig = (bits & 0x7FFFFF) | 0x800000  # 24-bit significand, x = sig * 2**(exp - 150)
    # bits of sig below e4m3's last mantissa bit: 20 for normal e4m3 values (>= 2**-6), more for its
    # subnormals (a fixed spacing of 2**-9), 25 past them (everything rounds to 0)
    drop = tl.minimum(tl.maximum(141 - exp, 20), 25)
    q = sig >> drop
    rem = sig - (q << drop)
    half = 1 << (drop - 1)
    q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    unit = (tl.maximum(drop + exp - 23, 1) << 23).to(tl.float32, bitcast=True)  # 2**(drop + exp - 150)
    y = tl.where(q == 0, 0.0, q.to(tl.float32) * unit)
    # x's sign bit onto y, as bits: a negative x that rounds to zero gives -0.0, as the reference's cast does
    # (not ``-y``: Triton releases before a 2026 fix compile that as ``0 - y``, which turns -0.0 into +0.0)
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31  # 0x80000000 or 0
    return (y.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


# ----------------------------------------------------------------------------------------------
# store_kvcache
# ----------------------------------------------------------------------------------------------


@triton.jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    heads_kept = tl.where(slot >= 0, num_kv_heads, 0)  # slot -1: store (and load) nothing
    safe = tl.maximum(slot, 0)
    blk = safe // BLOCK_SIZE
    off = safe % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < heads_kept) & (offs_d[None, :] < HEAD_DIM)

    k = tl.load(k_ptr + tok * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                mask=mask, other=0.0)
    v = tl.load(v_ptr + tok * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                mask=mask, other=0.0)
    dst = blk * stride_cb + off * stride_cs + offs_h[:, None].to(tl.int64) * stride_ch + offs_d[None, :] * stride_cd
    if FP8:
        h_mask = offs_h < heads_kept
        k = _to_e4m3(k.to(tl.float32), tl.load(ks_ptr + offs_h, mask=h_mask, other=1.0)[:, None])
        v = _to_e4m3(v.to(tl.float32), tl.load(vs_ptr + offs_h, mask=h_mask, other=1.0)[:, None])
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> None:
    """Write k/v ([N, Hkv, D], any strides) into ``k_cache``/``v_cache`` at ``slot_mapping`` ([N]; -1: skip);
    into an FP8 cache as ``quantize_fp8(k, k_scale)`` (and V likewise), bit for bit."""
    fp8 = _check_cache(k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape[0] == num_tokens
    assert k_cache.shape[2] == num_kv_heads and k_cache.shape[3] == head_dim
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *k_cache.stride(),
        num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_kv_heads), BLOCK_D=next_pow2(head_dim), FP8=fp8,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1, **pdl_options(k.device),
    )


# ----------------------------------------------------------------------------------------------
# qk-norm + RoPE + KV store, fused: what happens between the QKV projection and attention
# ----------------------------------------------------------------------------------------------


@triton.jit
def _qkv_rope_store_kernel(
    qkv_ptr, pos_ptr, cos_sin_ptr, qw_ptr, kw_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    stride_t, stride_pos, eps,
    stride_cb, stride_cs, stride_ch, stride_cd,
    NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HAS_NORM: tl.constexpr, STORE: tl.constexpr, FP8: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_pos + offs_d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_pos + HALF + offs_d, mask=d_mask, other=0.0)[None, :]
    row = qkv_ptr + tok * stride_t
    if tl.program_id(1) == 0:
        _rope_query_heads(row, qw_ptr, cos, sin, offs_d, d_mask, eps,
                          NUM_HEADS, HEAD_DIM, HALF, BLOCK_H, HAS_NORM)
    else:
        _rope_key_heads_store(row, tok, kw_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr, cos, sin, offs_d, d_mask,
                              eps, stride_cb, stride_cs, stride_ch, stride_cd,
                              NUM_HEADS, NUM_KV, HEAD_DIM, HALF, BLOCK_KV, BLOCK_SIZE, HAS_NORM, STORE, FP8)


@triton.jit
def _rope_query_heads(row, qw_ptr, cos, sin, offs_d, d_mask, eps,
                      NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                      BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr):
    dtype = row.dtype.element_ty
    # query heads: [BLOCK_H, HALF] halves x1 = x[:, :D/2], x2 = x[:, D/2:]
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < NUM_HEADS) & d_mask[None, :]
    ptr = row + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # RMSNorm over each head, rounded where rms_norm rounds: weight * x.to(dtype)
        r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(qw_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(qw_ptr + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rope_key_heads_store(row, tok, kw_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr, cos, sin, offs_d, d_mask,
                          eps, stride_cb, stride_cs, stride_ch, stride_cd,
                          NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                          HALF: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          HAS_NORM: tl.constexpr, STORE: tl.constexpr, FP8: tl.constexpr):
    dtype = row.dtype.element_ty
    # key heads, then the cache: K rotated, V as it is
    offs_k = tl.arange(0, BLOCK_KV)
    kmask = (offs_k[:, None] < NUM_KV) & d_mask[None, :]
    kptr = row + (NUM_HEADS + offs_k[:, None]) * HEAD_DIM + offs_d[None, :]
    y1 = tl.load(kptr, mask=kmask, other=0.0).to(tl.float32)
    y2 = tl.load(kptr + HALF, mask=kmask, other=0.0).to(tl.float32)
    if HAS_NORM:
        r = tl.rsqrt((tl.sum(y1 * y1, 1) + tl.sum(y2 * y2, 1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(kw_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(kw_ptr + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        y1 = (w1 * (y1 * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        y2 = (w2 * (y2 * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    k1 = (y1 * cos - y2 * sin).to(dtype)
    k2 = (y2 * cos + y1 * sin).to(dtype)
    tl.store(kptr, k1, mask=kmask)
    tl.store(kptr + HALF, k2, mask=kmask)
    if STORE:
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot >= 0:  # slot -1: a padding row, nothing to store
            vptr = kptr + NUM_KV * HEAD_DIM
            v1 = tl.load(vptr, mask=kmask, other=0.0)
            v2 = tl.load(vptr + HALF, mask=kmask, other=0.0)
            # the values the cache stores, in its dtype (new names: inside this runtime `if`, Triton's compiler
            # refuses a variable of the enclosing scope redefined with another type)
            ct = kc_ptr.dtype.element_ty
            ck1, ck2, cv1, cv2 = k1.to(ct), k2.to(ct), v1.to(ct), v2.to(ct)
            if FP8:  # the rounded K (k1, k2: what the model attends with) and V, scaled per KV head
                ks = tl.load(ks_ptr + offs_k, mask=offs_k < NUM_KV, other=1.0)[:, None]
                vs = tl.load(vs_ptr + offs_k, mask=offs_k < NUM_KV, other=1.0)[:, None]
                ck1, ck2 = _to_e4m3(k1.to(tl.float32), ks).to(ct), _to_e4m3(k2.to(tl.float32), ks).to(ct)
                cv1, cv2 = _to_e4m3(v1.to(tl.float32), vs).to(ct), _to_e4m3(v2.to(tl.float32), vs).to(ct)
            dst = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
                   + offs_k[:, None].to(tl.int64) * stride_ch + offs_d[None, :] * stride_cd)
            tl.store(kc_ptr + dst, ck1, mask=kmask)
            tl.store(kc_ptr + dst + HALF * stride_cd, ck2, mask=kmask)
            tl.store(vc_ptr + dst, cv1, mask=kmask)
            tl.store(vc_ptr + dst + HALF * stride_cd, cv2, mask=kmask)


def qkv_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, num_heads: int,
                   num_kv_heads: int, head_dim: int, q_norm_weight: torch.Tensor | None = None,
                   k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                   k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
                   slot_mapping: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None):
    """One kernel for everything between the QKV projection and attention, in place on ``qkv``
    ([N, (H + 2 Hkv) * D], rows contiguous): the optional per-head RMSNorm of queries and keys (Qwen3),
    RoPE on both (``cos_sin`` [max_pos, D] float32: cos of the D/2 frequencies, then sin), and the
    store of the rotated K and of V into the paged cache at ``slot_mapping`` (-1: skip; no cache: no
    store; an FP8 cache with its ``k_scale``/``v_scale``).  Returns the views q [N, H, D], k, v [N, Hkv, D],
    equal to what ``rms_norm``, ``apply_rotary`` and ``store_kvcache`` compute one after the other."""
    num_tokens = qkv.shape[0]
    assert qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert head_dim % 2 == 0 and cos_sin.shape[1] == head_dim and cos_sin.stride(1) == 1
    assert (q_norm_weight is None) == (k_norm_weight is None)
    store = k_cache is not None and k_cache.numel() > 0
    fp8 = False
    if store:
        fp8 = _check_cache(k_cache, v_cache, k_scale, v_scale)
        assert k_cache.shape[2] == num_kv_heads and k_cache.shape[3] == head_dim
        assert slot_mapping.shape[0] == num_tokens
    if num_tokens:
        half = head_dim // 2
        norm = q_norm_weight is not None
        dummy = positions  # unused pointer arguments
        _qkv_rope_store_kernel[(num_tokens, 2)](  # per token: one program for the queries, one for K/V
            qkv, positions, cos_sin, q_norm_weight if norm else dummy, k_norm_weight if norm else dummy,
            k_cache if store else qkv, v_cache if store else qkv, slot_mapping if store else dummy,
            k_scale if fp8 else dummy, v_scale if fp8 else dummy,
            qkv.stride(0), cos_sin.stride(0), float(eps),
            *(k_cache.stride() if store else (0, 0, 0, 0)),
            NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
            BLOCK_H=next_pow2(num_heads), BLOCK_KV=next_pow2(num_kv_heads), BLOCK_HALF=next_pow2(half),
            BLOCK_SIZE=k_cache.shape[1] if store else 1, HAS_NORM=norm, STORE=store, FP8=fp8,
            num_warps=4 if num_heads * head_dim >= 1024 else 1, **pdl_options(qkv.device),
        )
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    return (q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
            v.view(-1, num_kv_heads, head_dim))


# ----------------------------------------------------------------------------------------------
# decode: split-KV attention of one query per sequence
# ----------------------------------------------------------------------------------------------


@triton.jit
def _e4m3_words_to_f16(w, PTX: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A tile of e4m3 values read as 16-bit words, two values each ([ROWS, COLS // 2] uint16), widened to float16
    ([ROWS, COLS]).  Read as bytes, the decode kernel's FP8 tiles leave shared memory a byte per instruction (V's,
    whose products run over its rows) and widen through extra integer work; as words, they go through 16-byte
    copies and ``ldmatrix`` as a bfloat16 tile does (``tests/ptx_ops.py``).  ``PTX``: the GPU's own instruction,
    one ``cvt.rn.f16x2.e4m3x2`` per word in inline PTX (sm_89 and later, not the interpreter); else Triton's
    conversion, value by value.  Both widen exactly: the same float16 values."""
    if PTX:
        f = tl.inline_asm_elementwise(
            "{ .reg .b16 a, b; mov.b32 {a, b}, $2; cvt.rn.f16x2.e4m3x2 $0, a; cvt.rn.f16x2.e4m3x2 $1, b; }",
            "=r,=r,r", [w], dtype=tl.uint32, is_pure=True, pack=2)  # a word -> its two values as float16x2
        lo = (f & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (f >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    else:
        lo = (w & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)  # the low byte: even columns
        hi = (w >> 8).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return tl.reshape(tl.join(lo, hi), [ROWS, COLS])


@triton.jit(do_not_specialize=["stride_btb"])  # the block-table width varies step to step
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, ks_ptr, vs_ptr,
    out_ptr, mid_o_ptr, mid_lse_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    num_heads, num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_wb, stride_ws, stride_wh,  # (FP8_WORDS) the cache's strides in 16-bit words
    stride_btb,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, HEADS_FIRST: tl.constexpr = False,
    FP8: tl.constexpr = False, F16_DOT: tl.constexpr = False, FP8_WORDS: tl.constexpr = 0,
    FP8_K_WORDS: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    if HEADS_FIRST:  # a sequence's KV heads side by side in launch order (they read the same cache blocks)
        kvh = tl.program_id(0)
        seq = tl.program_id(1)
    else:
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(ctx_ptr + seq)
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    t_start = split * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM

    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if F16_DOT:  # K and V (below: .to(q.dtype)) widen from e4m3 to float16, one instruction per pair of values
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)

    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    head_off = kvh.to(tl.int64) * stride_ch
    if FP8:  # K's scale goes into the softmax scale, V's onto the output
        qk_scale = qk_scale * tl.load(ks_ptr + kvh)
    offs_w = tl.arange(0, BLOCK_D // 2)  # (FP8_WORDS) the tile's 16-bit words: two values each
    w_mask = offs_w < HEAD_DIM // 2
    for t in range(t_start, t_end):
        pos = t * BLOCK_N + offs_n
        n_mask = pos < ctx
        phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok_off = phys * stride_cb + (pos % BLOCK_SIZE).to(tl.int64) * stride_cs + head_off
        kv_off = tok_off[:, None] + offs_d[None, :] * stride_cd
        kv_mask = n_mask[:, None] & d_mask[None, :]

        if FP8_WORDS:  # the tiles as 16-bit words (V's; K's too with FP8_K_WORDS)
            w_row = phys * stride_wb + (pos % BLOCK_SIZE).to(tl.int64) * stride_ws + kvh.to(tl.int64) * stride_wh
            w_off = w_row[:, None] + offs_w[None, :]  # a contiguous head of even length: whole words
            w_msk = n_mask[:, None] & w_mask[None, :]
        if FP8_K_WORDS:  # K's tile as 16-bit words too (the cache's K and V share their strides)
            k = _e4m3_words_to_f16(tl.load(kc_ptr.to(tl.pointer_type(tl.uint16)) + w_off, mask=w_msk, other=0),
                                   FP8_WORDS == 2, BLOCK_N, BLOCK_D)
        else:
            k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [GROUP_PAD, BLOCK_N] fp32
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every tile holds at least one valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8_WORDS:
            v = _e4m3_words_to_f16(tl.load(vc_ptr.to(tl.pointer_type(tl.uint16)) + w_off, mask=w_msk, other=0),
                                   FP8_WORDS == 2, BLOCK_N, BLOCK_D)
        else:
            v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0  # false only for an empty split (or a padded sequence with context length 0)
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if FP8:
        o = o * tl.load(vs_ptr + kvh)
    if SINGLE_SPLIT:
        tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # base-2 log-sum-exp
        row = (seq.to(tl.int64) * num_heads + heads) * num_splits + split  # mid: [B, H, S(, D)]
        tl.store(mid_lse_ptr + row, lse, mask=g_mask)
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    num_heads, num_splits,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM

    row = (seq.to(tl.int64) * num_heads + head) * num_splits + offs_s
    lse = tl.load(mid_lse_ptr + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (context length 0): output zeros
    w = tl.exp2(lse - m)  # empty splits: exp2(-inf) = 0
    o = tl.load(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    den = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d * stride_od,
             res.to(out_ptr.dtype.element_ty), mask=d_mask)


DECODE_BLOCK_N = 64
MAX_SPLITS = 32
BIG_TILE_PROGRAMS_PER_SM = 4  # from this many (sequence, KV head) programs per SM, tiles of 128 tokens
DECODE_WAVES = 2  # from this many (sequence, KV head) programs per SM, no split
SPLIT_PROGRAMS_PER_SM = 4  # below it, enough splits for about this many programs per SM
DECODE_STAGES = 3  # pipeline depth of the K/V loads (single split); split programs are short: 4
FP8_DECODE_STAGES = (2, 3)  # over an FP8 cache (tiles of 128 tokens at any batch): one split, several


def pick_num_splits(batch: int, num_kv_heads: int, max_context_len: int, num_sms: int = 132,
                    block_n: int = DECODE_BLOCK_N, min_tiles_per_split: int = 2) -> int:
    """Split count for decode: one split when there are ``DECODE_WAVES`` (sequence, KV head) programs per
    SM; fewer, and enough splits for about ``SPLIT_PROGRAMS_PER_SM`` programs per SM, while each split
    keeps at least ``min_tiles_per_split`` tiles of ``block_n`` tokens."""
    programs = max(batch * num_kv_heads, 1)
    if programs >= DECODE_WAVES * num_sms:
        return 1
    by_occupancy = cdiv(SPLIT_PROGRAMS_PER_SM * num_sms, programs)
    by_length = max(cdiv(max(max_context_len, 1), block_n) // min_tiles_per_split, 1)
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def decode_launch(batch: int, num_kv_heads: int, num_splits: int, block_d: int, elem_size: int,
                  device: torch.device, fp8: bool = False) -> dict:
    """Tile length, pipeline depth and program order of the decode kernel: the settings that timed
    fastest on an H100 over the seed benchmark's batches, 28 layers replayed from a CUDA graph
    (``tests/gpu/decode_sweep.py --graph``; the numbers are in ``figures/data/kernel_measurements.md``).

    * one split: a sequence's KV heads side by side in launch order (they read the same cache blocks,
      and timed faster than sequence-major), three stages, tiles of 128 tokens once there are
      ``BIG_TILE_PROGRAMS_PER_SM`` programs per SM (and 16-bit values);
    * several splits: tiles of 64 tokens, four stages;
    * ``fp8`` (an FP8 cache, ``elem_size`` q's): tiles of 128 tokens at every batch, two stages (one split) or
      three (several): on an H100, 2026-12-06, at batch 37 of the seed benchmark 57.8 us per layer against 77.3
      with the 16-bit values' settings, at batch 218 137.1 against 144.3.
    The stages shrink to what fits the device's shared memory (K and V tiles of every stage)."""
    single = num_splits == 1
    big = single and batch * num_kv_heads >= BIG_TILE_PROGRAMS_PER_SM * num_sms(device)
    if fp8:
        block_n = 128 if block_d <= 128 else DECODE_BLOCK_N
        per_stage, most = 2 * block_n * block_d, FP8_DECODE_STAGES[0 if single else 1]
    else:
        block_n = 128 if big and elem_size == 2 and block_d <= 128 else DECODE_BLOCK_N
        per_stage, most = 2 * block_n * block_d * elem_size, DECODE_STAGES if single else 4
    room = max_shared_memory(device) - 8 * 1024  # leave room for the rest
    stages = max(1, min(most, room // per_stage))
    # KV-head-major puts the batch in the grid's second dimension, which CUDA caps at 65,535
    return dict(block_n=block_n, num_stages=stages, heads_first=single and batch <= 65535)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, out: torch.Tensor | None = None, *,
                           max_context_len: int | None = None, block_n: int | None = None,
                           num_warps: int = 4, num_stages: int | None = None,
                           heads_first: bool | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, f16_dot: bool = False,
                           fp8_words: str | None = None, fp8_words_k: bool = False) -> torch.Tensor:
    """Decode attention: ``q`` [B, H, D] (one query per sequence) over each sequence's
    ``context_lens[b]`` cached tokens.  Returns [B, H, D] (into ``out`` if given).

    ``num_splits=None`` picks the split count from B, Hkv and ``max_context_len`` (an int from the
    host; default: the block-table width times the block size, an upper bound).  Any split count is
    correct for any context lengths, so the launch can be captured in a CUDA graph and replayed.
    An FP8 cache is read with its per-KV-head ``k_scale``/``v_scale``.  ``f16_dot`` (an FP8 cache only; off here,
    on in ``TritonBackend`` for bfloat16 queries): the products in float16 rather than in q's dtype.  On sm_90
    Triton widens e4m3 to bfloat16 through float16 (one conversion per pair of values, then one more per value);
    float16 skips the second.  q is rounded to float16 (exact for bfloat16 values between 2**-14 and 65504,
    clamped beyond), and the softmax weights are rounded to float16, finer than bfloat16.  Measured on an H100
    (``tests/gpu/decode_sweep.py --graph --fp8``, 28 layers from a CUDA graph): at batches 218, 101 and 37 of the
    seed benchmark the fastest launches all had float16 products, 4-17% faster than the bfloat16 ones'.
    ``fp8_words`` (with ``f16_dot``; None, the default here, reads bytes): "convert" or "asm" read the V tile as
    16-bit words and widen it by Triton's conversion or by the GPU's own instruction in inline PTX ("asm": sm_89
    and later, as the FP8 cache is; in the interpreter it falls back to "convert", the same values)
    (``_e4m3_words_to_f16``); ``fp8_words_k`` reads K's tile the same way.  ``TritonBackend`` takes "asm" for
    both: on an H100 at the seed benchmark's batches 218, 101 and 37 (the sweep above) it took 138 / 104 / 58 us
    per layer against 170 / 128 / 76 us reading bytes (``figures/data/kernel_measurements.md``).
    """
    fp8 = _check_cache(k_cache, v_cache, k_scale, v_scale)
    if f16_dot and not fp8:
        raise ValueError("f16_dot=True is for an FP8 cache (a model-dtype cache is read in its own dtype)")
    words = {None: 0, "convert": 1, "asm": 2}.get(fp8_words)
    if words is None:
        raise ValueError(f"fp8_words must be None, 'convert' or 'asm', got {fp8_words!r}")
    if words == 2 and type(_decode_split_kernel).__name__ == "InterpretedFunction":
        words = 1  # no PTX in Triton's interpreter: its conversion, the same values
    if fp8_words_k and not words:
        raise ValueError("fp8_words_k reads K as words as fp8_words reads V: it needs fp8_words")
    if fp8_words_k and k_cache.stride() != v_cache.stride():
        raise ValueError("fp8_words_k needs K and V caches of the same strides")
    if words and not f16_dot:
        raise ValueError("fp8_words widens the FP8 cache to float16, for float16 products: it needs f16_dot=True")
    if words and (v_cache.stride(-1) != 1 or v_cache.shape[-1] % 2 or any(x % 2 for x in v_cache.stride()[:-1])):
        raise ValueError("fp8_words reads each head as 16-bit words: it needs a contiguous head of even length")
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1
    assert block_n is None or (block_n >= 16 and block_n & (block_n - 1) == 0)
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    sms = num_sms(q.device)
    if num_splits is None:
        if max_context_len is None:
            max_context_len = block_tables.shape[1] * block_size
        num_splits = pick_num_splits(batch, num_kv_heads, max_context_len, sms, block_n or DECODE_BLOCK_N)
    num_splits = max(int(num_splits), 1)
    block_d = max(next_pow2(head_dim), 16)
    auto = decode_launch(batch, num_kv_heads, num_splits, block_d, q.element_size(), q.device, fp8=fp8)
    block_n = auto["block_n"] if block_n is None else block_n
    num_stages = auto["num_stages"] if num_stages is None else num_stages
    heads_first = auto["heads_first"] if heads_first is None else heads_first
    single = num_splits == 1
    if single:  # write the output directly; no reduction
        mid_o = mid_lse = out
    else:
        mid_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    grid = (num_kv_heads, batch, num_splits) if heads_first else (batch, num_kv_heads, num_splits)
    key = ("decode", q.device.index, q.dtype, k_cache.dtype, block_n, block_d, group, heads_first, single,
           num_warps, num_stages, f16_dot, words, fp8_words_k)
    launch_fitting_stages(
        _decode_split_kernel, grid, key, num_stages,
        q, k_cache, v_cache, block_tables, context_lens, k_scale if fp8 else context_lens,
        v_scale if fp8 else context_lens,
        out, mid_o, mid_lse,
        float(scale) * LOG2E,
        num_heads, num_splits,
        q.stride(0), q.stride(1), q.stride(2),
        *k_cache.stride(),
        *(x // 2 for x in v_cache.stride()[:3]),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, GROUP_PAD=max(next_pow2(group), 16),
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        SINGLE_SPLIT=single, DOT_PRECISION=dot_precision(q.dtype), HEADS_FIRST=heads_first, FP8=fp8,
        F16_DOT=f16_dot, FP8_WORDS=words, FP8_K_WORDS=fp8_words_k, num_warps=num_warps, **pdl_options(q.device),
    )
    if not single:
        _decode_reduce_kernel[(batch, num_heads)](
            mid_o, mid_lse, out,
            num_heads, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits),
            num_warps=4, **pdl_options(q.device),
        )
    return out


# ----------------------------------------------------------------------------------------------
# decode over an FP8 cache as one balanced pass over the batch's tiles ("flat")
# ----------------------------------------------------------------------------------------------
#
# The split kernel above runs a program per (sequence, KV head) (and split): over an FP8 cache a program reads half
# the bytes of a bfloat16 one in as many steps, so its start (the context length, the block table, then its first
# tiles, with nothing of its own in flight), its end and the programs of the last wave weigh twice as much.  Here
# the grid is as many programs as the GPU holds at once; the batch's (sequence, KV head) items are laid end to end
# in tiles of FLAT_BLOCK_N tokens and program p takes the p-th equal run of tiles, so every program reads as many
# tiles whatever the contexts.  One loop runs over a program's tiles whatever items they belong to, so the software
# pipeline loads the next item's first tiles while the item before is still in the products.  Where a run ends
# inside an item, its output and log-sum-exp go to ``_flat_combine_kernel``, which also writes zeros for rows of no
# context.  Off in the backend until timed on a GPU (TritonBackend.fp8_flat; figures/data/fp8_words_h100.txt
# section 27; tests/gpu/flat_decode.py times it against the split kernel).

FLAT_BLOCK_N = 128  # tokens a tile
FLAT_MAX_PROGRAMS_PER_SM = 3  # registers: ~163 a thread at 4 warps (sm_90, Triton 3.6) hold an SM to 3 programs


def flat_programs_per_sm(head_dim: int, group_pad: int, num_stages: int, q_carried: bool, bt_ahead: bool,
                         device: torch.device) -> int:
    """How many flat-decode programs an SM holds by shared memory (at most ``FLAT_MAX_PROGRAMS_PER_SM``): a stage's
    K and V tiles (one byte a value; the pipeline keeps one stage's fewer unless the block table is read ahead) and
    q's copies (bfloat16, one a stage unless carried).  Compiled for sm_90 by Triton 3.6 (head_dim 128) the kernel
    takes 73,732 bytes at 2 stages and 110,600 at 3 with the block table ahead, within 10 bytes of this; at 3
    stages without it 74,244, less than this, but its 195 registers a thread hold an SM to 2 programs anyway."""
    kv_stages = num_stages if bt_ahead or num_stages <= 2 else 2
    q_copies = 1 if q_carried else num_stages
    need = kv_stages * 2 * FLAT_BLOCK_N * head_dim + q_copies * group_pad * head_dim * 2 + 1024  # + the SM's own
    return max(1, min(FLAT_MAX_PROGRAMS_PER_SM, (max_shared_memory(device) + 1024) // need))


@triton.jit
def _batch_tiles(ctx_ptr, batch, NUM_KV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Every sequence's tiles (an item's: each of its KV heads has as many), and the batch's tiles up to and
    including each sequence's, every KV head."""
    offs_b = tl.arange(0, BLOCK_B)
    n_all = tl.cdiv(tl.load(ctx_ptr + offs_b, mask=offs_b < batch, other=0), BLOCK_N)
    return offs_b, n_all, tl.cumsum(n_all, 0) * NUM_KV


@triton.jit
def _item_query(q_ptr, seq, kvh, batch, stride_qb, stride_qh, offs_g, offs_d, GROUP: tl.constexpr):
    """The query rows of a (sequence, KV head) item, as float16 (bfloat16 values clamped to its range)."""
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=((offs_g < GROUP) & (seq + 0 * offs_g < batch))[:, None], other=0.0)
    return tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def _tile_blocks(bt_ptr, seq, tile, ctx, batch, stride_btb, offs_n, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 TMA: tl.constexpr):
    """Where a sequence's tile lies in the cache: its block (TMA: a tile is one block), or each of its tokens'
    blocks (0 past the context; the block table's row ends with the sequence's blocks)."""
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    pos = tile * BLOCK_N + offs_n
    if TMA:
        blocks = tl.load(bt_row + tile, mask=(seq < batch) & (tile * BLOCK_N < ctx), other=0)
    else:
        blocks = tl.load(bt_row + pos // BLOCK_SIZE, mask=(pos < ctx) & (seq + 0 * pos < batch), other=0).to(tl.int64)
    return blocks


@triton.jit
def _flat_decode_kernel(
    q_ptr, kw_ptr, vw_ptr, k_desc, v_desc, bt_ptr, ctx_ptr, ks_ptr, vs_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    batch, qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_wb, stride_ws, stride_wh, stride_btb, stride_ob, stride_oh,
    NUM_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_B: tl.constexpr,
    TMA: tl.constexpr, PTX: tl.constexpr,
    Q_CARRIED: tl.constexpr = False,  # q in registers from item to item, read again as an item starts (else: a tile)
    BT_AHEAD: tl.constexpr = False,  # the block table read a tile ahead (so the pipeline's stages all hold K and V)
    PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    pid = tl.program_id(0)
    offs_b, n_all, incl = _batch_tiles(ctx_ptr, batch, NUM_KV, BLOCK_N, BLOCK_B)
    total = tl.sum(n_all, 0) * NUM_KV
    per = tl.cdiv(total, tl.num_programs(0))
    t0 = pid * per
    t1 = tl.minimum(t0 + per, total)
    # the item holding tile t0: sequence, KV head, and the tile within the item
    seq = tl.sum((incl <= t0).to(tl.int32), 0)
    before = tl.sum(tl.where(offs_b < seq, n_all, 0), 0) * NUM_KV
    ctx = tl.load(ctx_ptr + seq, mask=seq < batch, other=0)
    n = tl.cdiv(ctx, BLOCK_N)
    rel = t0 - before
    kvh = rel // tl.maximum(n, 1)
    tile = rel % tl.maximum(n, 1)
    first = tile  # the part's first tile in its item: 0 when the part starts the item

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, HEAD_DIM // 2)
    g_mask = offs_g < GROUP
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if Q_CARRIED:
        q = _item_query(q_ptr, seq, kvh, batch, stride_qb, stride_qh, offs_g, offs_d, GROUP)
    if BT_AHEAD:
        blocks = _tile_blocks(bt_ptr, seq, tile, ctx, batch, stride_btb, offs_n, BLOCK_N, BLOCK_SIZE, TMA)
    for j in range(t0, t1):
        heads = kvh * GROUP + offs_g
        if not Q_CARRIED:  # a copy of q a tile, in the software pipeline with the tile's K and V
            q = _item_query(q_ptr, seq, kvh, batch, stride_qb, stride_qh, offs_g, offs_d, GROUP)
        scale = qk_scale * tl.load(ks_ptr + kvh)
        pos = tile * BLOCK_N + offs_n
        n_mask = pos < ctx
        if not BT_AHEAD:
            blocks = _tile_blocks(bt_ptr, seq, tile, ctx, batch, stride_btb, offs_n, BLOCK_N, BLOCK_SIZE, TMA)
        if TMA:  # the tile is the sequence's tile-th cache block
            row = blocks * BLOCK_N
            k = k_desc.load([row, kvh * HEAD_DIM]).to(tl.float16)
        else:
            phys = blocks
            w_off = (phys * stride_wb + (pos % BLOCK_SIZE).to(tl.int64) * stride_ws
                     + kvh.to(tl.int64) * stride_wh)[:, None] + offs_w[None, :]
            k = _e4m3_words_to_f16(tl.load(kw_ptr + w_off, mask=n_mask[:, None], other=0), PTX, BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        qk = tl.where(n_mask[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every tile holds a token of the context
        alpha = tl.exp2(m_i - m_new)  # 0 at an item's first tile (m_i = -inf): acc and l_i start again there
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:  # TMA cannot mask: rows past the context are stale bytes (NaN too), zeroed
            v = tl.where(n_mask[:, None], v_desc.load([row, kvh * HEAD_DIM]).to(tl.float16), 0.0)
        else:
            v = _e4m3_words_to_f16(tl.load(vw_ptr + w_off, mask=n_mask[:, None], other=0), PTX, BLOCK_N, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
        last = (tile == n - 1) | (j == t1 - 1)  # the end of the item, or of this program's tiles
        if last:
            o = acc / l_i[:, None] * tl.load(vs_ptr + kvh)
            if (first == 0) & (tile == n - 1):  # the whole item: the output
                tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
            else:  # a part: its output and log-sum-exp, for the combining kernel (part pid + item: unique)
                part = (pid + seq * NUM_KV + kvh).to(tl.int64) * GROUP + offs_g
                tl.store(mid_lse_ptr + part, m_i + tl.log2(l_i), mask=g_mask)
                tl.store(mid_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None])
        m_i = tl.where(last, float("-inf"), m_i)
        tile += 1
        if tile == n:  # the next item
            tile = 0
            first = 0
            kvh += 1
            if kvh == NUM_KV:  # the next sequence with a context (the search steps over rows of none)
                kvh = 0
                seq = tl.sum((incl <= j + 1).to(tl.int32), 0)
                ctx = tl.load(ctx_ptr + seq, mask=seq < batch, other=0)
                n = tl.cdiv(ctx, BLOCK_N)
            if Q_CARRIED:
                q = _item_query(q_ptr, seq, kvh, batch, stride_qb, stride_qh, offs_g, offs_d, GROUP)
        if BT_AHEAD:  # the next tile's blocks, read a tile ahead of its copies
            blocks = _tile_blocks(bt_ptr, seq, tile, ctx, batch, stride_btb, offs_n, BLOCK_N, BLOCK_SIZE, TMA)


@triton.jit
def _flat_combine_kernel(
    mid_o_ptr, mid_lse_ptr, ctx_ptr, out_ptr, batch, programs, stride_ob, stride_oh,
    NUM_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, PDL: tl.constexpr = False,
):
    """One (sequence, KV head) item: nothing where one program read all of it, zeros where it has no context, else
    its parts' outputs weighted by their log-sum-exps."""
    pdl_wait(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_b, n_all, incl = _batch_tiles(ctx_ptr, batch, NUM_KV, BLOCK_N, BLOCK_B)
    per = tl.cdiv(tl.sum(n_all, 0) * NUM_KV, programs)
    n = tl.cdiv(tl.load(ctx_ptr + seq), BLOCK_N)
    start = tl.sum(tl.where(offs_b < seq, n_all, 0), 0) * NUM_KV + kvh * n
    p_first = start // tl.maximum(per, 1)
    p_last = (start + n - 1) // tl.maximum(per, 1)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    dst = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if n == 0:
        tl.store(dst, tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    elif p_first != p_last:
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for p in range(p_first, p_last + 1):
            part = (p + seq * NUM_KV + kvh).to(tl.int64) * GROUP + offs_g
            lse = tl.load(mid_lse_ptr + part, mask=g_mask, other=0.0)
            o = tl.load(mid_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=g_mask[:, None], other=0.0)
            m_new = tl.maximum(m, lse)
            a = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            den = den * a + w
            acc = acc * a[:, None] + o * w[:, None]
            m = m_new
        tl.store(dst, (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def _flat_decode_refusal(q, k_cache, v_cache, block_tables, tma: bool = False) -> str | None:
    """Why ``flat_decode_attention`` cannot read this cache for these queries, or None."""
    head_dim = k_cache.shape[-1]
    if not is_fp8(k_cache) or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return "the flat kernel reads a contiguous e4m3 cache"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim must be a power of two of 16 or more, got {head_dim}"
    if tma and k_cache.shape[1] != FLAT_BLOCK_N:
        return (f"by TMA the flat kernel reads one cache block a tile: it needs blocks of {FLAT_BLOCK_N} tokens, "
                f"got {k_cache.shape[1]}")
    if q.stride(-1) != 1 or block_tables.stride(-1) != 1:
        return "the flat kernel reads q's head dimension and the block table's rows contiguous"
    return None


def flat_decode_reads(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor) -> bool:
    """Whether ``flat_decode_attention`` (its word reads) takes this cache and these queries."""
    return _flat_decode_refusal(q, k_cache, v_cache, block_tables) is None


def flat_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                          k_scale: torch.Tensor, v_scale: torch.Tensor, out: torch.Tensor | None = None, *,
                          tma: bool = False, programs: int | None = None, programs_per_sm: int | None = None,
                          num_stages: int = 2, num_warps: int = 4, q_carried: bool = False,
                          bt_ahead: bool = False) -> torch.Tensor:
    """Decode attention over an FP8 cache [num_blocks, block_size, kv_heads, head_dim] (head_dim a power of two, 16
    or more; ``tma``: blocks of 128 tokens, sm_90), float16 products as ``paged_decode_attention`` with
    ``f16_dot=True, fp8_words="asm", fp8_words_k=True``: ``q`` [B, H, D] -> [B, H, D] (into ``out`` if given), as
    one balanced pass over the batch's tiles (``_flat_decode_kernel``), then ``_flat_combine_kernel``.
    ``programs``: how many programs share the batch's tiles; default ``programs_per_sm`` x the GPU's SMs, and
    ``programs_per_sm`` by default as many as an SM holds (``flat_programs_per_sm``: at head_dim 128 and 2 stages, 3
    on an H100 and 1 on an 8 GB Ada laptop card).
    ``q_carried``: q stays in registers through an item's tiles (read again as the next item starts, outside the
    pipeline) rather than copied with every tile.  ``bt_ahead``: each tile's blocks read from the block table one
    tile before its copies are issued, so that every pipeline stage holds K and V tiles (else the pipeliner gives a
    stage to the block table's read: fp8_words_h100.txt section 8)."""
    refusal = _flat_decode_refusal(q, k_cache, v_cache, block_tables, tma)
    if refusal:
        raise ValueError(refusal)
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    batch, num_heads, _ = q.shape
    group = num_heads // kv_heads
    group_pad = max(next_pow2(group), 16)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be shaped as q {tuple(q.shape)} with its head dimension contiguous")
    if batch == 0:
        return out
    if programs is None:
        if programs_per_sm is None:
            programs_per_sm = flat_programs_per_sm(head_dim, group_pad, num_stages, q_carried, bt_ahead, q.device)
        programs = programs_per_sm * num_sms(q.device)
    parts = programs + batch * kv_heads
    mid_o = torch.empty(parts * group * head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(parts * group, dtype=torch.float32, device=q.device)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc, v_desc = (TensorDescriptor.from_tensor(c.view(num_blocks * block_size, kv_heads * head_dim),
                                                       [FLAT_BLOCK_N, head_dim]) for c in (k_cache, v_cache))
    else:
        k_desc = v_desc = None
    kw, vw = k_cache.view(torch.uint16), v_cache.view(torch.uint16)
    interpreted = type(_flat_decode_kernel).__name__ == "InterpretedFunction"
    pdl = pdl_options(q.device)
    block_b = max(next_pow2(batch), 16)
    common = dict(NUM_KV=kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_N=FLAT_BLOCK_N,
                  BLOCK_B=block_b)
    _flat_decode_kernel[(programs,)](
        q, kw, vw, k_desc, v_desc, block_tables, context_lens, k_scale, v_scale, out, mid_o, mid_lse,
        batch, float(scale) * LOG2E,
        q.stride(0), q.stride(1), *kw.stride()[:3], block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, TMA=tma, PTX=not interpreted, Q_CARRIED=q_carried, BT_AHEAD=bt_ahead,
        num_stages=num_stages, num_warps=num_warps, **common, **pdl,
    )
    _flat_combine_kernel[(batch, kv_heads)](
        mid_o, mid_lse, context_lens, out, batch, programs, out.stride(0), out.stride(1), num_warps=4, **common,
        **pdl,
    )
    return out


# ----------------------------------------------------------------------------------------------
# prefill: varlen causal attention over the paged cache
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_btb"])  # the block-table width varies step to step
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr,
    cu_q_ptr, ctx_ptr, bt_ptr, ks_ptr, vs_ptr,
    qk_scale,
    stride_qn, stride_qh, stride_qd,
    stride_on, stride_oh, stride_od,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of the tile: BLOCK_Q query tokens x GROUP heads (padded)
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    q_blk = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)

    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if q_blk * BLOCK_Q >= q_len:
        return
    ctx = tl.load(ctx_ptr + seq)
    prefix = ctx - q_len  # query j sits at position prefix + j

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok = q_blk * BLOCK_Q + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    d_mask = offs_d < HEAD_DIM
    q_pos = prefix + tok  # >= 0 for every row, so key 0 is visible to every row: no all -inf row

    q_tok = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_tok[:, None] * stride_qn + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # keys 0 .. (position of this tile's last query) are needed; later tiles are skipped
    last_tok = tl.minimum(q_blk * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = prefix + last_tok + 1
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    head_off = kvh.to(tl.int64) * stride_ch
    if FP8:  # as in decode: K's scale into the softmax scale, V's onto the output
        qk_scale = qk_scale * tl.load(ks_ptr + kvh)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < kv_end
        phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok_off = phys * stride_cb + (pos % BLOCK_SIZE).to(tl.int64) * stride_cs + head_off
        kv_off = tok_off[:, None] + offs_d[None, :] * stride_cd
        kv_mask = n_mask[:, None] & d_mask[None, :]

        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        visible = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    if FP8:
        o = o * tl.load(vs_ptr + kvh)
    tl.store(out_ptr + q_tok[:, None] * stride_on + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _prefill_config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if dtype == torch.float32 or block_d > 128:
        return 64, 32, 4, 1
    return 64, 64, 4, 2


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, scale: float, max_seqlen_q: int, *,
                            out: torch.Tensor | None = None, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen causal prefill.  ``q`` [N, H, D] holds each sequence's last ``q_len`` tokens
    (``cu_seqlens_q`` [B+1] int32), which attend over ``context_lens[b]`` keys read from the paged cache
    (prefix + the new tokens, already stored).  ``max_seqlen_q`` (host int) sizes the grid.  An FP8 cache
    is read with its per-KV-head ``k_scale``/``v_scale``.  Returns [N, H, D]."""
    fp8 = _check_cache(k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim and num_heads % num_kv_heads == 0
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or batch == 0 or max_seqlen_q <= 0:
        return out
    group = num_heads // num_kv_heads
    block_d = max(next_pow2(head_dim), 16)
    cfg_m, cfg_n, cfg_w, cfg_s = _prefill_config(q.dtype, block_d)
    block_m = max(block_m or cfg_m, next_pow2(group), 16)
    block_n = block_n or cfg_n
    assert block_m & (block_m - 1) == 0 and block_n >= 16 and block_n & (block_n - 1) == 0
    block_q = block_m // group
    grid = (cdiv(int(max_seqlen_q), block_q), batch, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out,
        cu_seqlens_q, context_lens, block_tables, k_scale if fp8 else context_lens, v_scale if fp8 else context_lens,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *k_cache.stride(),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), FP8=fp8,
        num_warps=num_warps or cfg_w, num_stages=num_stages or cfg_s, **pdl_options(q.device),
    )
    return out


# ----------------------------------------------------------------------------------------------
# backend
# ----------------------------------------------------------------------------------------------


class TritonBackend(AttentionBackend):
    """Paged attention with the Triton kernels above; same results as ``TorchRefBackend``."""

    name = "triton"
    block_size_multiple = 1  # the kernels address the cache per token: any block size works
    cuda_graph_safe = True  # decode reads only shapes on the host: no syncs, grid fixed by the buffers
    prefill_graph_safe = True  # prefill programs past a sequence's new tokens return at once
    supports_fp8_kv = True  # on a GPU of compute capability 8.9 or newer (its e4m3 conversions), see usable

    # decode over an FP8 cache with float16 products: how the tiles are read and widened (paged_decode_attention):
    # K and V as 16-bit words widened by the GPU's e4m3 instruction, the fastest on an H100 (kernel_measurements.md)
    fp8_words: str | None = "asm"
    fp8_words_k: bool = True
    # ... and as one balanced pass over the batch's tiles (flat_decode_attention) rather than a program per sequence
    # and KV head: off until timed on a GPU (figures/data/fp8_words_h100.txt section 27)
    fp8_flat: bool = False

    def __init__(self, num_splits: int | None = None, fp8_f16_dot: bool = True):
        self.num_splits = num_splits  # decode split count; None: heuristic
        # decode over an FP8 cache with bfloat16 queries: the products in float16 (see paged_decode_attention)
        self.fp8_f16_dot = fp8_f16_dot

    @classmethod
    def usable(cls, device, dtype) -> bool:
        return device.type == "cuda"  # on a CPU only by name (the interpreter is for tests)

    @classmethod
    def fp8_kv_usable(cls, device) -> bool:
        # Triton converts to and from e4m3 ("fp8e4nv") on compute capability 8.9 (Ada) and newer
        return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)

    def fuses_rope_store(self, device) -> bool:
        return True  # its kernels run anywhere it does (a GPU, or the interpreter)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        if k_cache is None or k_cache.numel() == 0:
            return
        store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None):
        if k_cache is None or k_cache.numel() == 0:  # no cache yet (a warm-up forward)
            return varlen_causal_attention(q, k, v, meta.cu_seqlens_q, scale)
        if not meta.is_prefill:
            # the split heuristic reads only shapes (block-table width x block size bounds the context),
            # so a captured CUDA graph and an eager step with the same shapes launch the same grid
            f16_dot = self.fp8_f16_dot and k_scale is not None and q.dtype == torch.bfloat16
            words = f16_dot and self.fp8_words is not None and v_cache.stride(-1) == 1 and not any(
                x % 2 for x in (*v_cache.stride()[:-1], v_cache.shape[-1]))  # whole 16-bit words per head
            k_words = words and self.fp8_words_k and k_cache.stride() == v_cache.stride()
            if k_words and self.fp8_flat and flat_decode_reads(q, k_cache, v_cache, meta.block_tables):
                return flat_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                             k_scale, v_scale)
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                          num_splits=self.num_splits, k_scale=k_scale, v_scale=v_scale,
                                          f16_dot=f16_dot, fp8_words=self.fp8_words if words else None,
                                          fp8_words_k=k_words)
        return paged_prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.context_lens,
                                       meta.block_tables, scale, meta.max_seqlen_q, k_scale=k_scale,
                                       v_scale=v_scale)
