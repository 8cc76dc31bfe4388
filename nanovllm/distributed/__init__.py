"""Tensor parallelism on torch.distributed (NCCL on CUDA, gloo on CPU)."""

import torch.distributed as dist


def tp_rank_size() -> tuple[int, int]:
    """This process's rank and the tensor-parallel world size ((0, 1) when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(x):
    """Sum ``x`` over the tensor-parallel ranks, in place; a no-op on one rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x
