"""Helpers shared by every Triton kernel of the package (attention, the decode GEMM, the sampler).

Importing this module needs neither triton nor a GPU: the launch helper imports triton when it runs.
``HAS_TRITON`` says whether triton is installed at all (it is not on macOS or Windows, where Triton publishes
no wheels); without it the engine takes its PyTorch paths, and ``MissingTriton`` lets the book define its
kernels (to read them) even where they cannot run.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or deliberately blocked install
        return False


#: whether ``import triton`` can work here: found, not imported (so importing this module stays cheap)
HAS_TRITON = _triton_installed()

NO_TRITON_NOTE = (
    "Triton is not installed here, so this Triton code cannot run. On Linux, `pip install triton` installs it "
    "(Triton publishes wheels for Linux only); on a machine without a GPU Triton then runs kernels in its "
    "interpreter, with TRITON_INTERPRET=1 set before the kernels are defined: slow, but the same results. "
    "nanovllm itself needs no Triton: without it the engine uses its PyTorch paths.")


class MissingTriton:
    """Stands in for ``triton`` and ``triton.language`` where Triton is not installed, so that a notebook's
    kernels can still be defined and read: ``@triton.jit`` keeps the function, names such as
    ``tl.constexpr`` (in annotations) give this stand-in back, and launching a kernel, or calling anything
    of Triton's, raises ImportError with ``NO_TRITON_NOTE``."""

    __version__ = "not installed"

    def jit(self, fn=None, **options):
        if fn is None:  # @triton.jit(...) with options
            return lambda f: _UnlaunchableKernel(f)
        return _UnlaunchableKernel(fn)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        raise ImportError(NO_TRITON_NOTE)


class _UnlaunchableKernel:
    """A ``@triton.jit`` function defined without Triton: readable (``.fn``), not launchable."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        raise ImportError(f"{self.fn.__name__}: {NO_TRITON_NOTE}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self.fn.__name__}: {NO_TRITON_NOTE}")


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
