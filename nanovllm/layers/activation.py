import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: the merged gate-up projection's first half, through SiLU, times its second half."""
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    def __init__(self, fn=silu_and_mul):
        super().__init__()
        self.fn = fn  # plain or compiled (nanovllm/kernels.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
