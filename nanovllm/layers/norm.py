"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from nanovllm.layers.linear import SplitK


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + residual
    return rms_norm(x, weight, eps), x


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, fn=rms_norm, add_fn=add_rms_norm, sum_add_fn=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.fn, self.add_fn = fn, add_fn  # plain or compiled (nanovllm/kernels.py)
        self.sum_add_fn = sum_add_fn  # (SplitK, residual, weight, eps): add_fn of the parts' sum, one kernel

    def forward(self, x: torch.Tensor | SplitK, residual: torch.Tensor | None = None):
        if isinstance(x, SplitK):  # a split-K product (RowParallelLinear): its parts summed first
            if residual is not None and self.sum_add_fn is not None:
                return self.sum_add_fn(x, residual, self.weight, self.eps)
            x = x.total()
        if residual is None:
            return self.fn(x, self.weight, self.eps)
        return self.add_fn(x, residual, self.weight, self.eps)
