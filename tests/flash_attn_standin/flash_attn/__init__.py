"""A stand-in for the flash-attn package: the two functions nanovllm calls, with flash-attn 2's documented
signatures and semantics, written in plain PyTorch.  flash-attn has no wheels on PyPI and cannot be built
here, so its backend's plumbing is tested through this module (on sys.path only in those tests).

Semantics kept from flash-attn 2: q/k/v are [tokens, heads, head_dim] (varlen) or [batch, seqlen, heads,
head_dim] (with_kvcache); a paged cache is [num_blocks, page_block_size, kv_heads, head_dim] with
page_block_size a multiple of 256; block_table is int32 [batch, max_blocks]; causal masks are aligned to
the bottom-right corner; GQA when kv_heads divides heads.
"""

import torch

__version__ = "2.0.0-standin"


def _attend(q, k, v, scale, causal):
    """q: [Lq, H, D], k/v: [Lk, Hkv, D] -> [Lq, H, D] (zeros when there are no keys)."""
    if k.shape[0] == 0:
        return torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1).float()
    v = v.repeat_interleave(group, 1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(q.dtype)


def _paged(cache, table, length):
    page = cache.shape[1]
    assert page % 256 == 0, "flash-attn's paged kernels need page_block_size % 256 == 0"
    n = (length + page - 1) // page
    return cache[table[:n].long()].flatten(0, 1)[:length]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0 and alibi_slopes is None
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        if block_table is None:
            ks, vs = k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
        else:
            length = ck[i + 1] - ck[i]
            ks, vs = _paged(k, block_table[i], length), _paged(v, block_table[i], length)
        out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], ks, vs, scale, causal)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    assert k is None and v is None and rotary_cos is None, "the stand-in covers what nanovllm uses"
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b, length in enumerate(cache_seqlens.tolist()):
        ks, vs = _paged(k_cache, block_table[b], length), _paged(v_cache, block_table[b], length)
        out[b] = _attend(q[b], ks, vs, scale, causal)
    return out
