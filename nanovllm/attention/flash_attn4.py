"""The flash-attn 4 backend: ``flash_attn.cute.flash_attn_varlen_func`` (PyPI package ``flash-attn-4``, CuTe DSL,
pure Python, compiled just in time) for prefill and decode, reading the paged cache through its ``page_table``.
For Hopper (compute capability 9.x) and Blackwell (10.x) GPUs, in float16 or bfloat16.  Run on an H200
(``tests/gpu/fa4_check.py``, 2026-12-06, flash-attn-4 4.0.0b40 on CUDA 13): its three calls within 0.01 of the
reference in bf16, decode and padded prefill replayed from CUDA graphs, greedy tokens of the engine as close to
``triton``'s as the torch reference's are (bf16 noise), but the seed benchmark at 0.86x (block size 16) and 0.90x
(128) of ``triton``'s tok/s; so it is used when asked for by name, and "auto" keeps ``triton``.

What flash-attn-4 4.0.0b40 (``flash_attn/cute/interface.py``, ``config.py``, ``paged_kv.py``) turned out to need:

- The three calls.  Prefill without a cached prefix: varlen over the new tokens, ``cu_seqlens_q`` for Q and for
  K/V, causal.  Prefill over a cached prefix (and chunked prefill, mixed batches): the new queries by
  ``cu_seqlens_q``, the keys from the cache through ``page_table`` [B, max_pages] int32 and ``seqused_k`` (the
  context lengths).  ``page_table`` cannot be combined with ``cu_seqlens_k`` (an assert).  Decode: Q as
  [B, 1, H, D] without ``cu_seqlens_q``, the same ``page_table`` + ``seqused_k``.  Causal masks are aligned to
  the bottom-right corner (the queries are a sequence's last tokens), as in flash-attn 2.
- The return value is a tuple ``(out, lse)`` (``lse`` None unless ``return_lse``): ``_first`` takes ``out``.
- Page (block) sizes: any.  A page of exactly ``tile_n`` tokens (128 for head_dim <= 128 on sm90,
  ``select_sm90_tile``; 128 on sm100 by default) is loaded by TMA; any other size takes a cp.async path that
  looks each row up in the page table (``PagedKVManager``; ``paged_kv_non_tma``), which on sm100 needs a head
  dim divisible by 16.  So nothing forces the block size: ``block_size_multiple`` stays 1 and the engine's
  16 is kept; block size 128 takes the TMA path, which may be faster (``fa4_check.py`` times both).
- Rows of a partially used page: the TMA path loads whole pages, so the rows past ``seqused_k`` in a
  sequence's last page are read (their scores are masked, but 0 x NaN is NaN): they must be finite.  The
  engine's cache is zero-initialised and a reused block holds earlier K/V, so they are.  Page-table entries
  past a sequence's pages are not read (the loads stop at ``seqused_k``), so the -1 padding is safe.
- FP8: flash-attn-4 reads FP8 only on sm100 ("FP8 is only supported on SM100") and wants Q, K and V in one
  dtype, not our e4m3 cache with per-head scales and 16-bit queries: an FP8 KV cache is refused (ValueError).
- CUDA graphs (``cuda_graph_safe``): the host side of a call reads no tensor contents and never synchronises
  (config selection is "host-only": shapes and Python ints; no ``.item()``/``.tolist()`` in the interface);
  what it allocates (the output, scheduler and TMA-descriptor workspaces) comes from PyTorch's caching
  allocator, which a capture serves from the graph's pool; its kernels launch on the current PyTorch stream
  (tvm-ffi takes the stream from the torch tensor arguments), so they land in the capture.  The kernel is
  compiled at a call's first shape, which the engine runs once before capturing it (``DecodeGraphs.capture``),
  and its compile key holds only shapes and flags, so the capture finds it compiled.  ``max_seqlen_k`` is an
  upper bound that must hold at every replay: the decode graphs pass ``max_model_len``.  Prefill steps are
  captured too (``prefill_graph_safe``): on the H200 a padded prefill replayed with other inputs matched the
  reference, and the engine gave the same tokens with and without prefill graphs.
"""

from __future__ import annotations

import torch

from nanovllm.attention.base import AttentionMetadata
from nanovllm.attention.flash_attn import FlashAttnBackend

NEEDS = ("the flash-attn-4 package (module flash_attn.cute) and a CUDA GPU of compute capability 9.x (Hopper) or "
         "10.x (Blackwell), in float16 or bfloat16")


def why_not_here(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why flash-attn 4 cannot run on ``device`` in ``dtype`` (None: it can).  A stand-in module that says it
    runs on a CPU (``RUNS_ON_CPU``, tests/flash_attn_standin/) is taken at its word."""
    try:
        import flash_attn.cute as fa4
    except ImportError:
        return "the flash-attn-4 package (module flash_attn.cute) is not installed"
    if getattr(fa4, "RUNS_ON_CPU", False):
        return None
    if device.type != "cuda":
        return f"its kernels need a CUDA GPU and the device is {str(device)!r}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"its kernels are built for compute capability 9.x or 10.x and this GPU is {major}.{minor}"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"its kernels take float16 or bfloat16, not {dtype}"
    return None


def _first(result):
    """``out`` from what ``flash_attn_varlen_func`` returns: ``(out, lse)`` in 4.0.0b40."""
    return result[0] if isinstance(result, tuple) else result


class FlashAttn4Backend(FlashAttnBackend):
    # flash-attn 2's backend gives it the KV store (Triton on a GPU) and the refusal of an FP8 cache
    name = "flash_attn4"
    block_size_multiple = 1  # any page size works (see the module's docstring); 128 takes the TMA path
    cuda_graph_safe = True  # reasoned from the interface's code (module docstring), replayed on an H200
    prefill_graph_safe = True  # the same for padded prefill steps (fa4_check.py's graphs and engine sections)
    supports_fp8_kv = False  # FP8 is sm100-only there, and wants Q/K/V in one dtype

    @classmethod
    def usable(cls, device, dtype) -> bool:
        # it stores K/V with our Triton kernel, so triton must be there too
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or why_not_here(device, dtype):
            return False
        try:
            import nanovllm.attention.triton_kernels  # noqa: F401
        except ImportError:
            return False
        return True

    def __init__(self):
        from flash_attn.cute import flash_attn_varlen_func

        self.varlen = flash_attn_varlen_func

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None):
        if k_scale is not None:
            raise ValueError(f"the {self.name} backend does not support kv_cache_dtype='fp8'")
        if k_cache is None or k_cache.numel() == 0 or (meta.is_prefill and not meta.has_prefix):
            return _first(self.varlen(q, k, v, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=meta.cu_seqlens_q,
                                      max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_q,
                                      softmax_scale=scale, causal=True))
        # the cache [num_blocks, block_size, Hkv, D] is the page pool: each sequence's keys are the first
        # context_lens[i] tokens of its block table's pages
        if meta.is_prefill:
            return _first(self.varlen(q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q,
                                      seqused_k=meta.context_lens, page_table=meta.block_tables,
                                      max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k,
                                      softmax_scale=scale, causal=True))
        out = self.varlen(q.unsqueeze(1), k_cache, v_cache, seqused_k=meta.context_lens, page_table=meta.block_tables,
                          max_seqlen_k=meta.max_seqlen_k, softmax_scale=scale, causal=True)
        return _first(out).squeeze(1)
