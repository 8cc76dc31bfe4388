"""Helpers shared by every Triton kernel of the package (attention, the decode GEMM, the sampler).

Importing this module needs neither triton nor a GPU: the launch helper imports triton when it runs.
"""

from __future__ import annotations

import functools

import torch


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (and >= 1): Triton's block sizes must be powers of two."""
    return 1 << (max(int(x), 1) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: exact ("ieee") products for float32 inputs, not TF32, so float32 runs
    match the reference closely.  16-bit inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 132 (an H100's) elsewhere, so that launch heuristics
    behave the same under the interpreter."""
    return _num_sms(device.type, device.index)


@functools.cache
def _num_sms(device_type: str, index: int | None) -> int:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                                ).multi_processor_count
    return 132


def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use (what Triton checks its kernels against)."""
    return _max_shared_memory(device.type, device.index)


@functools.cache
def _max_shared_memory(device_type: str, index: int | None) -> int:
    if device_type == "cuda" and torch.cuda.is_available():
        import triton

        i = index if index is not None else torch.cuda.current_device()
        return triton.runtime.driver.active.utils.get_device_properties(i)["max_shared_mem"]
    return 227 * 1024  # an H100's, so the interpreter picks what the H100 would


_FITTED_STAGES: dict[tuple, int] = {}


def launch_fitting_stages(kernel, grid, key: tuple, num_stages: int, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs, num_stages=...)`` with the deepest pipeline up to ``num_stages``
    whose buffers fit the GPU's shared memory: a launch Triton refuses for lack of it is retried with one
    stage fewer, and what fits is remembered under ``key`` (the launch's tile sizes, dtype and device),
    so later launches (and CUDA-graph captures, which come after a warm-up launch) go straight to it."""
    from triton.runtime.errors import OutOfResources

    stages = min(num_stages, _FITTED_STAGES.get(key, num_stages))
    while True:
        try:
            kernel[grid](*args, **kwargs, num_stages=stages)
            return
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            _FITTED_STAGES[key] = stages
