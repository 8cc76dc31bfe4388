"""Paged attention in plain PyTorch: runs on CPU and GPU, and is the reference every faster backend is
tested against.  Read this file before the Triton kernels: they compute exactly this.

An FP8 cache (``attention/fp8.py``) is written through ``quantize_fp8`` and read through ``dequantize_fp8``
with the layer's per-KV-head scales ``k_scale``/``v_scale`` ([Hkv] float32); any other cache holds the
values as they are (its scales are None)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm.attention.base import AttentionBackend, AttentionMetadata
from nanovllm.attention.fp8 import dequantize_fp8, is_fp8, quantize_fp8
from nanovllm.utils import cdiv


def store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Write each new token's K/V ([N, Hkv, D]) into its slot of the paged cache; slot -1 is skipped.
    An FP8 cache stores ``quantize_fp8(k, k_scale)`` (and V likewise)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    if is_fp8(k_cache):  # copied as bytes: PyTorch has no index_copy_ for float8 on a CPU
        k, v = quantize_fp8(k, k_scale).view(torch.uint8), quantize_fp8(v, v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def read_kv(x, scale, dtype) -> torch.Tensor:
    """Cached values ``x`` [..., Hkv, D] in ``dtype``: dequantized if the cache is FP8."""
    return dequantize_fp8(x, scale, dtype) if is_fp8(x) else x.to(dtype)


def gather_kv(cache, block_table, length: int, scale=None, dtype=None) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from the paged cache: [length, Hkv, D] (in ``dtype``,
    dequantized with ``scale`` if the cache is FP8; ``dtype`` None: as stored)."""
    block_size = cache.shape[1]
    num_blocks = cdiv(length, block_size)
    x = cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]
    return x if dtype is None else read_kv(x, scale, dtype)


def paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                        query_lens_cpu=None, context_lens_cpu=None, k_scale=None, v_scale=None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole context read from the cache.

    The simplest correct loop, one sequence at a time.  ``q``: [N, H, D]; returns [N, H, D].
    Sequence i's queries are its last ``q_len`` tokens, so query j sits at position ``context_len - q_len + j``
    and sees keys ``0 .. context_len - q_len + j``.  ``query_lens_cpu``/``context_lens_cpu``: the lengths as
    host lists, if the caller has them (else read from the tensors).  ``k_scale``/``v_scale``: an FP8 cache's.
    """
    if query_lens_cpu is None:
        query_lens_cpu = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    if context_lens_cpu is None:
        context_lens_cpu = context_lens.tolist()
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, context_len) in enumerate(zip(query_lens_cpu, context_lens_cpu)):
        k = gather_kv(k_cache, block_tables[i], context_len, k_scale, q.dtype)
        v = gather_kv(v_cache, block_tables[i], context_len, v_scale, q.dtype)
        out[start:start + q_len] = causal_attention(q[start:start + q_len], k, v, scale)
        start += q_len
    return out


def causal_attention(q, k, v, scale) -> torch.Tensor:
    """q: [Lq, H, D], k/v: [Lk, Hkv, D] with Lq <= Lk; queries are the last Lq positions."""
    q_len, k_len = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)
    if q_len == k_len:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale,
                                           enable_gqa=qt.shape[0] != kt.shape[0])
    else:  # queries at the bottom-right of the causal mask
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale,
                                           enable_gqa=qt.shape[0] != kt.shape[0])
    return o.transpose(0, 1)


def varlen_causal_attention(q, k, v, cu_seqlens_q, scale) -> torch.Tensor:
    """Causal attention of each sequence over its own new tokens only (no cache): [N, H, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        out[s:e] = causal_attention(q[s:e], k[s:e], v[s:e], scale)
    return out


def paged_decode_ref(q, k_cache, v_cache, context_lens, block_tables, scale, k_scale=None,
                     v_scale=None) -> torch.Tensor:
    """One query per sequence, all sequences at once: gather a padded [B, Hkv, L, D] view of the cache,
    mask the padding, and let each KV head's group of query heads share it.  q: [B, H, D].  The padding's
    keys and values are zeroed as well as masked: they are whatever the cache holds there (another sequence's
    tokens, bytes never written, NaN in an FP8 cache), and a masked NaN would still reach the output (a NaN
    score, or 0 x NaN)."""
    head_dim = q.shape[-1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(context_lens.max())
    pos = torch.arange(max_len, device=q.device)
    blocks = block_tables[:, pos // block_size].long().clamp_min(0)  # [B, L]
    slots = blocks * block_size + pos % block_size
    k = read_kv(k_cache.view(-1, num_kv_heads, head_dim)[slots], k_scale, q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
    v = read_kv(v_cache.view(-1, num_kv_heads, head_dim)[slots], v_scale, q.dtype).transpose(1, 2)
    valid = (pos[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    k, v = (x.masked_fill(~valid[:, :, 0, :, None], 0) for x in (k, v))
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=valid, scale=scale,
                                       enable_gqa=q.shape[1] != num_kv_heads)
    return o.squeeze(2)


class TorchRefBackend(AttentionBackend):
    name = "torch"

    supports_fp8_kv = True

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None):
        if k_cache is None or k_cache.numel() == 0:  # no cache yet (a warm-up forward)
            return varlen_causal_attention(q, k, v, meta.cu_seqlens_q, scale)
        if not meta.is_prefill:
            return paged_decode_ref(q, k_cache, v_cache, meta.context_lens, meta.block_tables, scale,
                                    k_scale, v_scale)
        return paged_attention_ref(q, k_cache, v_cache, meta.cu_seqlens_q, meta.context_lens,
                                   meta.block_tables, scale, meta.query_lens_cpu, meta.context_lens_cpu,
                                   k_scale, v_scale)
