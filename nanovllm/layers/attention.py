"""The attention layer: store this step's K/V in the paged cache, then let the backend attend.

With an FP8 cache the layer also holds its quantization scales (``k_scale``, ``v_scale``: [Hkv] float32,
set by the runner's calibration pass, during which ``kv_amax`` collects each KV head's largest |K| and |V|)."""

from __future__ import annotations

import torch
from torch import nn

from nanovllm.attention.base import AttentionBackend, AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale
        self.k_cache = self.v_cache = torch.tensor([])  # the runner hands each layer its slice of the cache
        self.k_scale = self.v_scale = None  # an FP8 cache's scales (attention/fp8.py)
        self.kv_amax: list | None = None  # a list while the runner calibrates the scales
        self.backend = backend

    def forward(self, q, k, v, meta: AttentionMetadata, kv_stored: bool = False) -> torch.Tensor:
        """``kv_stored``: the caller already wrote k/v into the cache (the fused RoPE + store kernel)."""
        if self.kv_amax is not None:
            self.kv_amax.append((k.abs().amax((0, 2)).float(), v.abs().amax((0, 2)).float()))
        # the scales only with an FP8 cache: a backend written for a model-dtype cache (chapter 03's) takes none
        scales = () if self.k_scale is None else (self.k_scale, self.v_scale)
        if self.k_cache.numel() and not kv_stored:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, *scales)
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale, *scales)
