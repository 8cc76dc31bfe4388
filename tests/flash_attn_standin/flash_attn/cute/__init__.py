"""A stand-in for flash-attn 4 (``flash_attn.cute``, PyPI ``flash-attn-4``): the one function nanovllm calls,
``flash_attn_varlen_func``, with 4.0.0b40's signature and semantics, in plain PyTorch.  The real package
compiles CuTe kernels for Hopper/Blackwell GPUs only, so its backend's plumbing is tested here through this
module (on sys.path only in those tests; it sits beside the flash-attn 2 stand-in, as the real flash_attn.cute
sits in the flash_attn package).

Kept from flash-attn 4 (flash_attn/cute/interface.py), as asserts where it asserts:
- q is (total_q, H, D) with ``cu_seqlens_q`` [B + 1], or (B, seqlen_q, H, D) without;
- K/V: (total_k, Hkv, D) with ``cu_seqlens_k``, or the page pool (num_pages, page_size, Hkv, D) with
  ``page_table`` (int32, [B, max_pages], contiguous in its last dim) and ``seqused_k`` [B]; ``page_table`` is
  not supported with ``cu_seqlens_k``; lengths and offsets are int32;
- the rows of a sequence's last, partially used page are read (the TMA path loads whole pages), so they must
  be finite; page-table entries past a sequence's pages are not read;
- ``max_seqlen_q``/``max_seqlen_k``, when given, bound the real lengths (a CUDA graph replays with them);
- causal masks are aligned to the bottom-right corner; GQA when Hkv divides H;
- it returns the tuple (out, lse), lse None unless ``return_lse``.
Unlike the real kernels it also takes float32 (so that the CPU tests compare tokens exactly with the reference)
and runs on a CPU (``RUNS_ON_CPU``, which nanovllm's check reads).
"""

import torch

from flash_attn import _attend  # the flash-attn 2 stand-in's attention: [Lq, H, D] over [Lk, Hkv, D]

__version__ = "4.0.0b40-standin"
RUNS_ON_CPU = True


def _paged(pool, row, length):
    """The first ``length`` keys of one sequence from the page pool, through its page-table row."""
    page = pool.shape[1]
    n = (length + page - 1) // page
    pages = row[:n].long()
    assert bool((pages >= 0).all()) and bool((pages < pool.shape[0]).all()), "a used page-table entry is out of range"
    x = pool[pages].flatten(0, 1)
    assert bool(torch.isfinite(x[length:].float()).all()), "rows past seqused_k in a last page must be finite"
    return x[:length]


def _int32(t, name):
    assert t.dtype == torch.int32, f"{name} must be int32"
    assert t.stride(0) == 1, f"{name} must be contiguous"


def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                           max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None,
                           gather_kv_indices=None, page_table=None, softmax_scale=None, causal=False,
                           window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                           deterministic=False, score_mod=None, mask_mod=None, return_lse=False, **rest):
    assert qv is None and seqused_q is None and gather_kv_indices is None and learnable_sink is None
    assert window_size == (None, None) and softcap == 0.0 and score_mod is None and mask_mod is None
    assert not return_lse and not any(rest.values()), "the stand-in covers what nanovllm uses"
    assert q.dtype == k.dtype == v.dtype, "q, k, v, and qv must have the same dtype"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), "the stand-in takes 16-bit (and float32)"
    num_heads, head_dim = q.shape[-2:]
    num_kv_heads = v.shape[-2]
    assert num_heads % num_kv_heads == 0, "num_head must be divisible by num_head_kv"
    assert 8 <= head_dim <= 256 and head_dim % 8 == 0, "head_dim must be between 8 and 256 and divisible by 8"
    if cu_seqlens_q is None:
        assert q.dim() == 4, "without cu_seqlens_q, q is (batch, seqlen_q, nheads, hdim)"
        batch = q.shape[0]
        q_bounds = [(b, slice(None)) for b in range(batch)]
    else:
        assert q.dim() == 3, "with cu_seqlens_q, q is (total_q, nheads, hdim)"
        _int32(cu_seqlens_q, "cu_seqlens_q")
        batch = cu_seqlens_q.shape[0] - 1
        cq = cu_seqlens_q.tolist()
        assert cq[0] == 0 and cq[-1] <= q.shape[0] and all(a <= b for a, b in zip(cq, cq[1:]))
        q_bounds = [(slice(cq[i], cq[i + 1]),) for i in range(batch)]
        if max_seqlen_q is not None:
            assert max(b - a for a, b in zip(cq, cq[1:])) <= max_seqlen_q, "max_seqlen_q is below a query length"
    if page_table is not None:
        assert cu_seqlens_k is None, "page_table is not supported with cu_seqlens_k"
        assert page_table.dtype == torch.int32, "page_table must be int32"
        assert page_table.stride(-1) == 1, "page_table must be contiguous in the last dimension"
        assert page_table.dim() == 2 and page_table.shape[0] == batch
        assert k.dim() == 4 and k.shape == v.shape, "a paged k/v is (num_pages, page_size, nheads_k, hdim)"
        assert seqused_k is not None and seqused_k.shape == (batch,), "nanovllm gives paged lengths by seqused_k"
        _int32(seqused_k, "seqused_k")
        lengths = seqused_k.tolist()
        assert max(lengths, default=0) <= page_table.shape[1] * k.shape[1], "seqused_k beyond the page table"
        keys = [(_paged(k, page_table[i], n), _paged(v, page_table[i], n)) for i, n in enumerate(lengths)]
    else:
        assert cu_seqlens_k is not None and seqused_k is None, "the stand-in covers what nanovllm uses"
        assert k.dim() == 3 and k.shape == v.shape, "with cu_seqlens_k, k/v are (total_k, nheads_k, hdim)"
        _int32(cu_seqlens_k, "cu_seqlens_k")
        assert cu_seqlens_k.shape == (batch + 1,), "cu_seqlens_k must have shape (batch_size + 1,)"
        ck = cu_seqlens_k.tolist()
        lengths = [b - a for a, b in zip(ck, ck[1:])]
        keys = [(k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]) for i in range(batch)]
    if max_seqlen_k is not None:
        assert max(lengths, default=0) <= max_seqlen_k, "max_seqlen_k is below a key length"
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    out = torch.zeros_like(q)
    for where, (ks, vs) in zip(q_bounds, keys):
        out[where] = _attend(q[where], ks, vs, scale, causal)
    return out, None
