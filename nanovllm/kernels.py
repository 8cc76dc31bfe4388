"""Which implementation each piece of the forward pass uses: chosen once, here, and handed to the model.

The model declares the fused paths it can take (``fusions()`` on its class); ``select_kernels`` picks,
for the engine's device, dtype and settings, the attention backend (``attention/``), compiled or plain
elementwise functions, and the fused kernels that apply; the model's layers keep what they are given.
``Kernels()`` alone is the reference: PyTorch attention, plain functions, nothing fused.

| piece                        | reference (CPU, ``enforce_eager``) | CUDA                                         |
|------------------------------|------------------------------------|----------------------------------------------|
| attention                    | ``torch_ref``                      | ``triton`` (or flash-attn 2/4, by name)      |
| RMSNorm, RoPE, SiLU-and-mul  | plain PyTorch                      | ``torch.compile``d (unless ``enforce_eager``)|
| qk-norm + RoPE + KV store    | three steps                        | one Triton kernel (``qkv_rope_store``)       |
| gate-up GEMM + SiLU-and-mul  | cuBLAS GEMM, then the activation   | one Triton kernel for decode-sized batches   |
| o / down GEMM + add-RMSNorm  | cuBLAS GEMM, then add + RMSNorm    | split-K GEMM, summed by the add-norm kernel  |
|                              |                                    | (decode, one rank; ``SPLITK_ADD_NORM``)      |
| qkv GEMM                     | cuBLAS GEMM                        | the Triton skinny GEMM for small batches     |
|                              |                                    | (only when ``TRITON_QKV``)                   |

On sm_90+ the Triton kernels can also be launched with programmatic dependent launch (``nanovllm/triton_pdl.py``,
its ``PDL`` switch): each may start while the kernel before it ends.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.norm import add_rms_norm, rms_norm
from nanovllm.layers.rotary import apply_rotary
from nanovllm.triton_utils import HAS_TRITON

#: the fused paths a model may declare
QKV_ROPE_STORE = "qkv_rope_store"  # qk-norm, RoPE and the KV-cache store in one kernel
GATE_UP_SILU = "gate_up_silu"  # the MLP's gate-up GEMM with SiLU-and-mul folded in
SPLITK_NORM = "splitk_norm"  # o and down split along K, their parts summed by the residual add + RMSNorm
QKV_GEMM = "qkv_gemm"  # the qkv projection (no bias) in the Triton skinny GEMM at decode sizes

#: whether a GPU engine takes SPLITK_NORM (tests/gpu/splitk_check.py timed its kernels alone; with PDL the seed
#: benchmark on an H100 is +0.8 % over PDL alone with an FP8 cache: figures/data/fp8_words_h100.txt sections 19-22).
#: Off, as PDL is, until the book has run with both on a GPU
SPLITK_ADD_NORM = False
#: whether a GPU engine takes QKV_GEMM (a layer's chain is then all Triton): timed in the engine with PDL, it gained
#: nothing the run-to-run spread does not cover (section 22), so it stays off
TRITON_QKV = False


def _reference_attention():
    from nanovllm.attention.torch_ref import TorchRefBackend

    return TorchRefBackend()


@dataclass(frozen=True)
class Kernels:
    attention: object = field(default_factory=_reference_attention)  # an AttentionBackend
    rms_norm: Callable = rms_norm
    add_rms_norm: Callable = add_rms_norm
    silu_and_mul: Callable = silu_and_mul
    apply_rotary: Callable = apply_rotary
    # fused paths (None: the step-by-step reference path)
    qkv_rope_store: Callable | None = None  # (qkv, positions, cos_sin, ...) -> q, k, v with K/V stored
    gate_up_silu: Callable | None = None  # (x, gate_up_weight) -> silu(x @ gate.T) * (x @ up.T)
    gate_up_silu_max_rows: int = 256  # larger batches (prefill) are faster with cuBLAS + the activation
    splitk_gemm: Callable | None = None  # (x, weight) -> SplitK, partial products along K (o and down)
    sum_add_rms_norm: Callable | None = None  # (SplitK, residual, weight, eps) -> normed, residual
    splitk_max_rows: int = 256
    qkv_gemm: Callable | None = None  # (x, qkv_weight) -> x @ qkv_weight.T
    qkv_gemm_max_rows: int = 64


@functools.cache
def compiled_functions() -> dict[str, Callable]:
    """RMSNorm(+residual), RoPE and SiLU-and-mul through ``torch.compile``: each becomes one fused kernel
    instead of several.  Made once per process and shared by every layer and every engine."""
    import torch._dynamo

    # one compiled entry per (dtype, rank) a function meets; several engines in one process (tests,
    # notebooks) meet more than dynamo's default limit of 8, past which it would silently run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return dict(rms_norm=torch.compile(rms_norm, dynamic=True), add_rms_norm=torch.compile(add_rms_norm, dynamic=True),
                silu_and_mul=torch.compile(silu_and_mul, dynamic=True),
                apply_rotary=torch.compile(apply_rotary, dynamic=True))


def select_kernels(attention_backend: str, device: torch.device, dtype: torch.dtype, enforce_eager: bool,
                   fusions: frozenset[str] = frozenset()) -> Kernels:
    """The kernels an engine uses: ``attention_backend`` (a name of the registry, or "auto"), compiled
    elementwise functions on CUDA unless ``enforce_eager`` (or Triton is missing), and those of the model's
    ``fusions`` that the device and backend support."""
    from nanovllm.attention import create_backend

    backend = create_backend(attention_backend, device, dtype)
    chosen: dict = {"attention": backend}
    if device.type == "cuda" and not enforce_eager:
        if HAS_TRITON:
            chosen.update(compiled_functions())
        else:  # torch.compile's GPU code generator (inductor) writes Triton kernels
            warnings.warn("torch.compile skipped: on a GPU it needs Triton, which is not installed here, so "
                          "RMSNorm, RoPE and SiLU-and-mul run as plain PyTorch (pip install triton enables it)",
                          stacklevel=2)
    if QKV_ROPE_STORE in fusions and backend.fuses_rope_store(device):
        from nanovllm.attention.triton_kernels import qkv_rope_store

        chosen["qkv_rope_store"] = qkv_rope_store
    if GATE_UP_SILU in fusions and device.type == "cuda":
        try:
            from nanovllm.layers.triton_gemm import skinny_gemm
        except ImportError:
            pass
        else:
            chosen["gate_up_silu"] = functools.partial(skinny_gemm, act="silu_mul")
    if SPLITK_NORM in fusions and SPLITK_ADD_NORM and device.type == "cuda" and HAS_TRITON:
        from nanovllm.layers.triton_gemm import splitk_gemm, sum_add_rms_norm

        chosen.update(splitk_gemm=splitk_gemm, sum_add_rms_norm=sum_add_rms_norm)
    if QKV_GEMM in fusions and TRITON_QKV and device.type == "cuda" and HAS_TRITON:
        from nanovllm.layers.triton_gemm import skinny_gemm

        chosen["qkv_gemm"] = skinny_gemm
    return Kernels(**chosen)
