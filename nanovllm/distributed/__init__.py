"""Tensor parallelism on torch.distributed (NCCL on CUDA, gloo on CPU): what the layers need.

A tensor-parallel engine runs one process per rank, each holding a slice of every weight matrix; the
layers combine the slices with two collectives: ``all_reduce`` (row-parallel outputs, the vocab-parallel
embedding) and ``all_gather`` (the LM head's vocabulary slices).  They run over a process group that
belongs to *one engine*, described by a ``TPGroup`` (this rank, the number of ranks, the group).

How a layer finds its group: the engine builds its model inside ``with tensor_parallel(tp): ...``; a layer
reads ``tp_rank_size()`` and ``current_group()`` once, in its constructor, and keeps the group for its
forward pass.  Outside such a block there is no group: ``tp_rank_size()`` is ``(0, 1)``,
``current_group()`` is None, and both collectives are no-ops, so a single-GPU engine never touches
torch.distributed.  The block sets a ``ContextVar`` and restores it on exit, so nothing stays set
after construction: two engines in one process (a notebook, say) each keep their own group, and neither
uses torch.distributed's process-wide default group.

How a rank waits for a collective: ``TPGroup.wait``, when set, receives the collective's ``Work`` and
returns once it is done.  torch's own wait blocks in C++, where Python cannot run: no Ctrl-C, no look at
the other ranks.  On the CPU (gloo) rank 0 of an engine waits in short slices instead and checks its
workers in between (``Workers.wait`` in ``tp_runner.py``); a worker notes that it is inside a collective
(so that waiting for a slower peer is not mistaken for being stuck).  On CUDA a collective only queues
work on the GPU's stream, so there is nothing to wait for here and ``wait`` stays None.

When its engine shuts down, the group is closed (``close()``): the ``ProcessGroup`` is dropped at once,
and with it gloo's threads and sockets and the rendezvous store's, even while the model that refers to
this ``TPGroup`` waits for a garbage collection.

This package holds the process groups (``group.py``) and the collectives only; the tensor-parallel engine
(processes, rendezvous, per-step messages) is ``nanovllm/engine/tp_runner.py``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(slots=True)
class TPGroup:
    rank: int
    size: int
    group: object  # a torch.distributed.ProcessGroup of exactly these ``size`` processes; None once closed
    wait: Callable | None = None  # waits for a collective's Work (None: torch's blocking wait)

    def close(self) -> None:
        """Drop the process group (its threads and sockets go with it); collectives then raise."""
        self.group = self.wait = None


_building: contextvars.ContextVar[TPGroup | None] = contextvars.ContextVar("nanovllm_tp_group", default=None)


@contextlib.contextmanager
def tensor_parallel(tp: TPGroup | None):
    """Layers constructed inside this block split themselves over ``tp`` (None: no splitting)."""
    token = _building.set(tp)
    try:
        yield tp
    finally:
        _building.reset(token)


def current_group() -> TPGroup | None:
    """The group of the model being built (None when not tensor-parallel)."""
    return _building.get()


def tp_rank_size() -> tuple[int, int]:
    """This rank and the number of ranks of the model being built ((0, 1) when not tensor-parallel)."""
    tp = _building.get()
    return (0, 1) if tp is None else (tp.rank, tp.size)


def all_reduce(x: torch.Tensor, tp: TPGroup | None = None) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``tp``, in place; a no-op without a group."""
    if tp is not None and tp.size > 1:
        _finish(tp, dist.all_reduce(x, group=_group(tp), async_op=tp.wait is not None))
    return x


def all_gather(x: torch.Tensor, tp: TPGroup | None = None) -> torch.Tensor:
    """Every rank's ``x``, concatenated along the last dimension in rank order; ``x`` without a group."""
    if tp is None or tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    _finish(tp, dist.all_gather(parts, x.contiguous(), group=_group(tp), async_op=tp.wait is not None))
    return torch.cat(parts, -1)


def _group(tp: TPGroup):
    if tp.group is None:
        raise RuntimeError("this tensor-parallel group has been closed (its engine was shut down)")
    return tp.group


def _finish(tp: TPGroup, work) -> None:
    if tp.wait is not None:
        tp.wait(work)
