"""The attention layer: store this step's K/V in the paged cache, then let the backend attend."""

from __future__ import annotations

import torch
from torch import nn

from nanovllm.attention.base import AttentionBackend, AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale
        self.k_cache = self.v_cache = torch.tensor([])  # the runner hands each layer its slice of the cache
        self.backend = backend

    def forward(self, q, k, v, meta: AttentionMetadata, kv_stored: bool = False) -> torch.Tensor:
        """``kv_stored``: the caller already wrote k/v into the cache (the fused RoPE + store kernel)."""
        if self.k_cache.numel() and not kv_stored:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
