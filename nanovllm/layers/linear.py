"""Linear layers, whole or split across tensor-parallel ranks.

Column-parallel layers split the output features (each rank computes a slice, no communication);
row-parallel layers split the input features (each rank computes a partial sum, then one all-reduce).
Each layer's parameters carry a ``weight_loader`` that copies this rank's slice out of a checkpoint
tensor, so a rank never reads more of the checkpoint than it keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import all_reduce, current_group, tp_rank_size


def narrow(loaded, dim: int, start: int, size: int):
    """``loaded.narrow(dim, start, size)`` for a tensor or a lazy safetensors slice (reads only that part)."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def materialize(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def default_weight_loader(param: nn.Parameter, loaded, *args) -> None:
    t = materialize(loaded)
    if t.shape != param.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(t.shape)}, the model expects {tuple(param.shape)}")
    param.data.copy_(t)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_size()
        self.tp_group = current_group()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = tp_rank_size()[1]
        if output_size % tp_size:
            raise ValueError(f"output size {output_size} does not divide by tensor_parallel_size={tp_size}")
        super().__init__(input_size, output_size // tp_size, bias)

    def weight_loader(self, param, loaded, *args):
        size = param.shape[0]
        param.data.copy_(materialize(narrow(loaded, 0, self.tp_rank * size, size)))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matrix (gate and up projections): one GEMM instead of two."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param, loaded, shard_id: int):
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        part = narrow(loaded, 0, self.tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(materialize(part))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matrix.  Each rank keeps its query heads and their KV heads; when
    there are fewer KV heads than ranks, each KV head is replicated on the ranks that need it."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp_rank, tp_size = tp_rank_size()
        check_head_split(num_heads, num_kv_heads, tp_size)
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)  # ranks sharing one KV head
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, out, bias)

    def weight_loader(self, param, loaded, shard_id: str):
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        if shard_id == "q":
            offset, size, start = 0, nh * hd, self.tp_rank * nh * hd
        else:
            offset = nh * hd if shard_id == "k" else (nh + nkv) * hd
            size, start = nkv * hd, (self.tp_rank // self.kv_replicas) * nkv * hd
        param.data.narrow(0, offset, size).copy_(materialize(narrow(loaded, 0, start, size)))


def check_head_split(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Attention heads must split evenly over the ranks (KV heads may be replicated instead)."""
    ok = num_heads % tp_size == 0 and (num_kv_heads % tp_size == 0 or tp_size % num_kv_heads == 0)
    if not ok:
        sizes = [n for n in range(1, num_heads + 1) if num_heads % n == 0
                 and (num_kv_heads % n == 0 or n % num_kv_heads == 0)]
        raise ValueError(f"tensor_parallel_size={tp_size} does not split {num_heads} query heads and "
                         f"{num_kv_heads} KV heads evenly; sizes that work for this model: {sizes}")


class RowParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = tp_rank_size()[1]
        if input_size % tp_size:
            raise ValueError(f"input size {input_size} does not divide by tensor_parallel_size={tp_size}")
        super().__init__(input_size // tp_size, output_size, bias)

    def weight_loader(self, param, loaded, *args):
        if param.dim() == 1:  # the bias is added once, on rank 0
            param.data.copy_(materialize(loaded) if self.tp_rank == 0 else torch.zeros_like(param))
            return
        size = param.shape[1]
        param.data.copy_(materialize(narrow(loaded, 1, self.tp_rank * size, size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight, self.bias), self.tp_group)
