"""The flash-attn 2 backend: its varlen kernel (with a block table) for prefill, ``flash_attn_with_kvcache``
for decode.  Used automatically on CUDA when the package is installed and the GPU supports it (compute
capability 8.0 or newer).  Its paged kernels need a block size that is a multiple of 256, so the engine's
block size follows this backend.

It refuses an FP8 KV cache (``kv_cache_dtype="fp8"``): flash-attn 2 reads only 16-bit caches, so with FP8
``attention_backend="auto"`` takes the Triton backend instead, and asking for this one is a ValueError.

Only the signatures documented by flash-attn 2 are used, so a stand-in module with the same functions
(tests/flash_attn_standin/) can exercise this plumbing where the real package cannot be installed.
"""

from __future__ import annotations

import torch

from nanovllm.attention.base import AttentionBackend, AttentionMetadata
from nanovllm.attention.torch_ref import store_kvcache_ref


def flash_attn_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:  # the function, not just the package: flash-attn 4's wheel makes flash_attn a namespace of its own
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    block_size_multiple = 256
    cuda_graph_safe = True
    supports_fp8_kv = False  # flash-attn 2's kernels read 16-bit caches only

    @classmethod
    def usable(cls, device, dtype) -> bool:
        # flash-attn has no float32 kernels; it stores K/V with our Triton kernel, so triton must be there too
        if dtype not in (torch.float16, torch.bfloat16) or not flash_attn_usable(device):
            return False
        try:
            import nanovllm.attention.triton_kernels  # noqa: F401
        except ImportError:
            return False
        return True

    def __init__(self):
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        self.varlen, self.with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache

    def fuses_rope_store(self, device) -> bool:
        return device.type == "cuda"  # it stores with Triton on a GPU, with the reference elsewhere

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        if k_scale is not None:
            raise ValueError(f"the {self.name} backend does not support kv_cache_dtype='fp8'")
        if k.is_cuda:
            from nanovllm.attention.triton_kernels import store_kvcache

            store_kvcache(k, v, k_cache, v_cache, slot_mapping)
        else:
            store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None):
        if k_scale is not None:
            raise ValueError(f"the {self.name} backend does not support kv_cache_dtype='fp8'")
        if k_cache is None or k_cache.numel() == 0 or (meta.is_prefill and not meta.has_prefix):
            return self.varlen(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q,
                               meta.max_seqlen_q, softmax_scale=scale, causal=True)
        if meta.is_prefill:
            return self.varlen(q, k_cache, v_cache, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q,
                               meta.max_seqlen_k, softmax_scale=scale, causal=True, block_table=meta.block_tables)
        out = self.with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                block_table=meta.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)
