"""Programmatic dependent launch (PDL): a kernel may start while the kernel before it is still ending.

A decode step is a chain of ~250 small kernels, and on a GPU each one normally starts only once the one
before it has ended: its programs are launched, find their SMs and ramp their loads up while the GPU
waits.  On sm_90 (Hopper) and newer a launch can carry the attribute ``programmaticStreamSerialization``
(Triton: ``launch_pdl=True``); the kernel's programs may then be scheduled as soon as the previous kernel
lets them (here: once each of its programs has passed its own wait, so no program of the previous kernel is
left waiting for an SM), and they wait at ``griddepcontrol.wait`` (``gdc_wait``) until that kernel has ended
and its writes are visible.  CUDA graphs keep this as a "programmatic" edge, so a replayed step gains it too.

Every kernel launched this way calls ``pdl_wait`` first, before it reads or writes anything, so it sees
exactly what it would see without PDL: the results do not change, bit for bit (tests/gpu/fp8_check.py --pdl
compares an engine's tokens and logprobs with it off and on; the CPU tests run the interpreter, where it is
off).  On an H100 it took ~5 us off a decode layer of Triton kernels at 8-128 rows (tests/gpu/pdl_check.py,
figures/data/fp8_words_h100.txt section 21).

``PDL`` switches it for the whole process; where it is on, it is taken wherever it can be: a CUDA device of
compute capability 9.0 or more and a Triton that has ``gdc_wait`` (3.4 and newer).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # Triton 3.4 and newer
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

#: take PDL wherever the device and Triton have it.  tests/gpu/fp8_check.py --pdl on an H100: the same tokens and
#: logprobs with it and without; the seed benchmark +1.5 % over an FP8 cache, +3.4 % with "auto" (section 22).  Off
#: until the book has run with it on a GPU (the device time of the session that timed it ran out first)
PDL = False


@functools.cache
def _pdl_capable(device_type: str, index: int | None) -> bool:
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    return HAS_GDC and torch.cuda.get_device_capability(
        index if index is not None else torch.cuda.current_device())[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` take PDL (``PDL`` on, sm_90+, a Triton that has it)."""
    return PDL and _pdl_capable(device.type, device.index)


def pdl_options(device: torch.device) -> dict:
    """The keyword arguments of a launch on ``device``: the kernel's ``PDL`` constexpr, and ``launch_pdl``
    where it is on (only then, so Triton's interpreter never meets it)."""
    return dict(PDL=True, launch_pdl=True) if use_pdl(device) else dict(PDL=False)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """A kernel's first step under PDL: wait until the kernel before it has ended and its writes are visible,
    then let the kernel after it be scheduled.  Nothing without PDL."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
