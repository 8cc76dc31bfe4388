"""Linear layers, whole or split across tensor-parallel ranks.

Column-parallel layers split the output features (each rank computes a slice, no communication);
row-parallel layers split the input features (each rank computes a partial sum, then one all-reduce).
Each layer's parameters carry a ``weight_loader`` that copies this rank's slice out of a checkpoint
tensor, so a rank never reads more of the checkpoint than it keeps; ``checkpoint_shape``, the whole tensor's
shape, which is checked before slicing (a tensor one row too long would otherwise be cut to fit); and
``shard_ids``, the pieces a merged parameter is loaded from (``("q", "k", "v")``; ``(None,)``: one tensor).
The first two reach their layer through a weak reference (``LayerMethod``), so that a model's weights are
freed as soon as the engine lets go of it.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import all_reduce, current_group, tp_rank_size


class SplitK(NamedTuple):
    """A product left as its ``parts.shape[0]`` partial sums along K: ``parts`` [S, M, N] float32, ``dtype``
    what the product would have been stored as.  ``RowParallelLinear`` returns one where it is given a split-K
    GEMM (decode, ``nanovllm/layers/triton_gemm.py``), and only ``RMSNorm``'s residual add takes it: it sums the
    parts first."""

    parts: torch.Tensor
    dtype: torch.dtype

    def total(self) -> torch.Tensor:
        """The product as the unsplit GEMM stores it (the reference path, and tests)."""
        return self.parts.sum(0).to(self.dtype)


def narrow(loaded, dim: int, start: int, size: int):
    """``loaded.narrow(dim, start, size)`` for a tensor or a lazy safetensors slice (reads only that part)."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def materialize(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def shape_of(loaded) -> tuple[int, ...]:
    """The whole shape of a tensor or of a lazy safetensors slice (nothing is read)."""
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def checkpoint_shape(param: nn.Parameter, shard_id=None) -> tuple[int, ...]:
    """The shape the whole checkpoint tensor for ``param`` (its piece ``shard_id``) must have."""
    fn = getattr(param, "checkpoint_shape", None)
    return tuple(param.shape) if fn is None else fn(param, shard_id)


def check_shape(loaded, expected: tuple[int, ...]) -> None:
    if shape_of(loaded) != tuple(expected):
        raise ValueError(f"checkpoint tensor has shape {shape_of(loaded)}, the model expects {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, loaded, *args) -> None:
    check_shape(loaded, param.shape)
    param.data.copy_(materialize(loaded))


class LayerMethod:
    """A layer's method, called through a weak reference to the layer: what a parameter carries as its
    ``weight_loader`` and ``checkpoint_shape``.  The bound method itself would hold the layer, which holds the
    parameter: a reference cycle, so every weight would outlive the engine until Python's cycle collector
    next ran (on a GPU, gigabytes held for an unknown while).  Without the cycle, reference counting frees
    the weights the moment the model is dropped."""

    __slots__ = ("method",)

    def __init__(self, bound_method):
        self.method = weakref.WeakMethod(bound_method)

    def __call__(self, *args):
        fn = self.method()
        if fn is None:
            raise RuntimeError("the layer this parameter belonged to no longer exists")
        return fn(*args)


def make_loadable(layer: nn.Module, param: nn.Parameter) -> nn.Parameter:
    """Give ``param`` its layer's ``weight_loader``, ``checkpoint_shape`` and ``shard_ids``."""
    param.weight_loader, param.checkpoint_shape = LayerMethod(layer.weight_loader), LayerMethod(layer.checkpoint_shape)
    param.shard_ids = getattr(layer, "shard_ids", (None,))
    return param


class LinearBase(nn.Module):
    """``input_size``/``output_size``: this rank's; ``whole``: the unsplit layer's (output, input) sizes."""

    shard_ids: tuple = (None,)

    def __init__(self, input_size: int, output_size: int, bias: bool, whole: tuple[int, int]):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_size()
        self.tp_group = current_group()
        self.whole_output_size, self.whole_input_size = whole
        self.weight = self.loadable(nn.Parameter(torch.empty(output_size, input_size), requires_grad=False))
        if bias:
            self.bias = self.loadable(nn.Parameter(torch.empty(output_size), requires_grad=False))
        else:
            self.register_parameter("bias", None)

    def loadable(self, param: nn.Parameter) -> nn.Parameter:
        return make_loadable(self, param)

    def checkpoint_shape(self, param, shard_id=None) -> tuple[int, ...]:
        """The whole checkpoint tensor's shape: (output, input) for the weight, (output,) for the bias."""
        return (self.checkpoint_rows(shard_id), self.whole_input_size)[:param.dim()]

    def checkpoint_rows(self, shard_id) -> int:
        return self.whole_output_size

    # (set by the model, for layers without a bias) x, weight -> the product from a Triton kernel, for batches of
    # up to ``triton_max_rows`` rows: the qkv projection's plain product (``nanovllm.kernels.TRITON_QKV``), or o's
    # and down's partial sums along K (``SplitK``, on one rank: the RMSNorm after them sums them)
    triton_gemm = None
    triton_max_rows = 0

    def takes_triton(self, x: torch.Tensor) -> bool:
        return self.triton_gemm is not None and x.shape[0] <= self.triton_max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_triton(x):
            return self.triton_gemm(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        tp_size = tp_rank_size()[1]
        if output_size % tp_size:
            raise ValueError(f"output size {output_size} does not divide by tensor_parallel_size={tp_size}")
        super().__init__(input_size, output_size // tp_size, bias, (output_size, input_size))

    def weight_loader(self, param, loaded, *args):
        check_shape(loaded, self.checkpoint_shape(param))
        size = param.shape[0]
        param.data.copy_(materialize(narrow(loaded, 0, self.tp_rank * size, size)))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matrix (gate and up projections): one GEMM instead of two."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias)

    def checkpoint_rows(self, shard_id: int) -> int:
        return self.output_sizes[shard_id]

    def weight_loader(self, param, loaded, shard_id: int):
        check_shape(loaded, self.checkpoint_shape(param, shard_id))
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        part = narrow(loaded, 0, self.tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(materialize(part))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matrix.  Each rank keeps its query heads and their KV heads; when
    there are fewer KV heads than ranks, each KV head is replicated on the ranks that need it."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp_rank, tp_size = tp_rank_size()
        check_head_split(num_heads, num_kv_heads, tp_size)
        self.head_dim = head_dim
        self.whole_num_heads, self.whole_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)  # ranks sharing one KV head
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        whole = (num_heads + 2 * num_kv_heads) * head_dim, hidden_size
        LinearBase.__init__(self, hidden_size, out, bias, whole)

    def checkpoint_rows(self, shard_id: str) -> int:
        return (self.whole_num_heads if shard_id == "q" else self.whole_num_kv_heads) * self.head_dim

    def weight_loader(self, param, loaded, shard_id: str):
        check_shape(loaded, self.checkpoint_shape(param, shard_id))
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
        super().__init__(input_size // tp_size, output_size, bias, (output_size, input_size))

    def weight_loader(self, param, loaded, *args):
        check_shape(loaded, self.checkpoint_shape(param))
        if param.dim() == 1:  # the bias is added once, on rank 0
            param.data.copy_(materialize(loaded) if self.tp_rank == 0 else torch.zeros_like(param))
            return
        size = param.shape[1]
        param.data.copy_(materialize(narrow(loaded, 1, self.tp_rank * size, size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | SplitK:
        if self.takes_triton(x):  # a SplitK (set on one rank only: no all-reduce to do)
            return self.triton_gemm(x, self.weight)
        return all_reduce(F.linear(x, self.weight, self.bias), self.tp_group)
