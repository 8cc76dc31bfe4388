"""Attention backends: one interface (``base.py``), a PyTorch reference (``torch_ref.py``), fast kernels beside
it, and the registry below, the one place where a backend is chosen.

Importing this package imports no backend: each is imported when it is created, so triton and flash-attn
are needed only by an engine that uses them.
"""

from __future__ import annotations

import importlib

import torch

# name -> (module, class); "auto" tries them in AUTO_ORDER
BACKENDS = {
    "torch": ("nanovllm.attention.torch_ref", "TorchRefBackend"),
    "triton": ("nanovllm.attention.triton_kernels", "TritonBackend"),
    "flash_attn": ("nanovllm.attention.flash_attn", "FlashAttnBackend"),
    "flash_attn4": ("nanovllm.attention.flash_attn4", "FlashAttn4Backend"),
}
# flash_attn (flash-attn 2) is left out of "auto" until it has run on real hardware (its plumbing is tested on a
# CPU through a stand-in only, tests/flash_attn_standin/); flash_attn4 (flash-attn 4, Hopper/Blackwell) has run on
# an H200 and matched the reference, but gave 0.86-0.90x triton's seed-benchmark tok/s there, so "auto" keeps
# triton. Each is used when asked for by name.
AUTO_ORDER = ("triton", "torch")


def backend_class(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown attention_backend {name!r}; choose from {['auto', *BACKENDS]}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def resolve_backend_name(name: str, device: torch.device, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> str:
    """``name``, or for "auto" the first backend of ``AUTO_ORDER`` that can run here (``usable``), with an FP8
    KV cache if ``kv_cache_dtype`` asks for one (``fp8_kv_usable``)."""
    if name != "auto":
        backend_class(name)  # unknown names fail here
        return name
    for candidate in AUTO_ORDER:
        try:
            cls = backend_class(candidate)
        except ImportError:  # triton or flash-attn not installed
            continue
        if cls.usable(device, dtype) and (kv_cache_dtype == "auto" or cls.fp8_kv_usable(device)):
            return candidate
    raise AssertionError("the torch backend is always usable")


def check_runs_here(name: str, device: torch.device, kv_cache_dtype: str = "auto",
                    dtype: torch.dtype | None = None) -> None:
    """Refuse, with a ValueError, a concrete backend that could be built on ``device`` (for a model in ``dtype``)
    but would fail at its first step (or cannot hold the ``kv_cache_dtype`` asked for).  ``LLM`` asks before
    loading the model.  (The registry itself builds any backend anywhere: tests take them apart on a CPU.)"""
    if kv_cache_dtype != "auto" and not backend_class(name).fp8_kv_usable(device):
        why = ("its kernels read 16-bit caches only" if not backend_class(name).supports_fp8_kv
               else f"it needs a GPU of compute capability 8.9 or newer for e4m3, and {str(device)!r} is older")
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} does not work with attention_backend={name!r}: "
                         f"{why}; use attention_backend='auto' (it picks one that does), 'triton' or 'torch'")
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"attention_backend='triton' on device {str(device)!r}: its kernels need a CUDA GPU, or on a CPU "
            "Triton's interpreter (slow; the tests use it), which is off: set TRITON_INTERPRET=1 in the "
            "environment before the kernels are first imported, or use attention_backend='torch' (or 'auto')")
    if name == "flash_attn4":
        from nanovllm.attention.flash_attn4 import NEEDS, why_not_here

        why = why_not_here(device, dtype)
        if why is not None:
            raise ValueError(f"attention_backend='flash_attn4' cannot run on device {str(device)!r}: {why}. It "
                             f"needs {NEEDS}; use attention_backend='auto' (it picks one that runs here), 'triton' "
                             "or 'torch'")


def triton_interpreted() -> bool:
    """Whether our Triton kernels were defined under Triton's interpreter (``TRITON_INTERPRET=1`` when their
    module was imported): the only way they run on a CPU."""
    module = importlib.import_module(BACKENDS["triton"][0])
    return type(module._store_kvcache_kernel).__name__ == "InterpretedFunction"


def create_backend(name: str, device: torch.device, dtype: torch.dtype):
    """The attention backend ``name`` ("auto": see ``resolve_backend_name``)."""
    return backend_class(resolve_backend_name(name, device, dtype))()
