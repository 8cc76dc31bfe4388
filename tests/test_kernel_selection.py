"""Kernel selection in one place: the backend registry, ``select_kernels``, and a model built with what was
chosen (its modules keep exactly those functions: nothing is patched in afterwards)."""

from __future__ import annotations

import pytest
import torch

from nanovllm.attention import AUTO_ORDER, BACKENDS, backend_class, create_backend, resolve_backend_name
from nanovllm.kernels import GATE_UP_SILU, QKV_GEMM, QKV_ROPE_STORE, SPLITK_NORM, Kernels, select_kernels
from nanovllm.layers.activation import SiluAndMul, silu_and_mul
from nanovllm.layers.attention import PagedAttention
from nanovllm.layers.norm import RMSNorm, rms_norm
from nanovllm.models.llama import MLP, DecoderAttention, Qwen3ForCausalLM

CPU = torch.device("cpu")


def test_auto_picks_the_reference_on_a_cpu():
    assert resolve_backend_name("auto", CPU, torch.float32) == "torch"
    assert resolve_backend_name("auto", CPU, torch.bfloat16) == "torch"
    assert set(AUTO_ORDER) == set(BACKENDS) - {"flash_attn", "flash_attn4"}  # not until they have run on hardware


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown attention_backend 'cudnn'"):
        resolve_backend_name("cudnn", CPU, torch.float32)


@pytest.mark.parametrize("name,requested,expected", [("torch", 16, 16), ("torch", 1, 1), ("flash_attn", 16, 256),
                                                     ("flash_attn", 512, 512), ("flash_attn", 300, 256),
                                                     ("flash_attn4", 16, 16), ("flash_attn4", 128, 128)])
def test_backends_say_the_block_size_they_need(name, requested, expected):
    assert backend_class(name).block_size(requested) == expected


def test_the_engine_config_gets_the_backends_block_size_and_is_not_mutated(tiny_qwen3, monkeypatch):
    """The engine asks the backend for its block size once; the runner never changes the config."""
    from nanovllm import LLM
    from nanovllm.attention.torch_ref import TorchRefBackend

    monkeypatch.setattr(TorchRefBackend, "block_size_multiple", 8)
    path, _ = tiny_qwen3
    llm = LLM(path, device="cpu", kvcache_block_size=4, num_kvcache_blocks=16)
    assert llm.config.kvcache_block_size == 8 == llm.runner.block_size == llm.block_manager.block_size
    assert llm.config.attention_backend == "torch"  # "auto", resolved


def test_reference_kernels_build_the_step_by_step_model(tiny_qwen3):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_qwen3[0])
    model = Qwen3ForCausalLM(cfg)  # no kernels: the reference
    assert Qwen3ForCausalLM.fusions(cfg) == {QKV_ROPE_STORE, GATE_UP_SILU, SPLITK_NORM, QKV_GEMM}
    attn = [m for m in model.modules() if isinstance(m, DecoderAttention)]
    assert attn and all(m.qkv_rope_store is None for m in attn)
    assert all(m.gate_up_silu is None for m in model.modules() if isinstance(m, MLP))
    assert all(m.fn is rms_norm for m in model.modules() if isinstance(m, RMSNorm))
    assert all(m.fn is silu_and_mul for m in model.modules() if isinstance(m, SiluAndMul))
    assert all(m.backend.name == "torch" for m in model.modules() if isinstance(m, PagedAttention))


def test_model_keeps_the_kernels_it_is_built_with(tiny_qwen3):
    """Every module takes its function from the Kernels object at construction."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_qwen3[0])

    def norm(x, w, eps):
        return rms_norm(x, w, eps)

    def fused_store(*args):
        raise AssertionError("not called here")

    def fused_mlp(x, w):
        raise AssertionError("not called here")

    kernels = Kernels(attention=create_backend("torch", CPU, torch.float32), rms_norm=norm,
                      qkv_rope_store=fused_store, gate_up_silu=fused_mlp)
    model = Qwen3ForCausalLM(cfg, kernels)
    assert all(m.fn is norm for m in model.modules() if isinstance(m, RMSNorm))
    assert all(m.qkv_rope_store is fused_store for m in model.modules() if isinstance(m, DecoderAttention))
    assert all(m.gate_up_silu is fused_mlp for m in model.modules() if isinstance(m, MLP))
    assert all(m.backend is kernels.attention for m in model.modules() if isinstance(m, PagedAttention))


def test_select_kernels_on_a_cpu_is_the_reference(monkeypatch):
    import nanovllm.kernels as nk

    assert nk.SPLITK_ADD_NORM is False and nk.TRITON_QKV is False  # off until the book has run with them on a GPU
    monkeypatch.setattr(nk, "SPLITK_ADD_NORM", True)  # and CUDA-only paths even when switched on
    monkeypatch.setattr(nk, "TRITON_QKV", True)
    k = select_kernels("auto", CPU, torch.float32, enforce_eager=False,
                       fusions=frozenset({QKV_ROPE_STORE, GATE_UP_SILU, SPLITK_NORM, QKV_GEMM}))
    assert k.attention.name == "torch" and k.qkv_rope_store is None and k.gate_up_silu is None
    assert k.splitk_gemm is None and k.sum_add_rms_norm is None and k.qkv_gemm is None
    assert k.rms_norm is rms_norm and k.silu_and_mul is silu_and_mul  # nothing compiled on a CPU


def test_select_kernels_takes_only_what_the_model_declares():
    pytest.importorskip("triton")
    from nanovllm.attention.triton_kernels import qkv_rope_store

    k = select_kernels("triton", CPU, torch.float32, enforce_eager=True, fusions=frozenset({QKV_ROPE_STORE}))
    assert k.attention.name == "triton" and k.qkv_rope_store is qkv_rope_store
    k = select_kernels("triton", CPU, torch.float32, enforce_eager=True, fusions=frozenset())
    assert k.qkv_rope_store is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_select_kernels_on_cuda_takes_every_fast_path(tiny_qwen3):
    from nanovllm import LLM
    from nanovllm.attention.triton_kernels import qkv_rope_store
    from nanovllm.kernels import compiled_functions

    small = dict(device="cuda", dtype="bfloat16", max_num_seqs=4, max_model_len=128, num_kvcache_blocks=64)
    llm = LLM(tiny_qwen3[0], **small)
    k = llm.runner.kernels
    assert k.attention.name in ("triton", "flash_attn") and k.qkv_rope_store is qkv_rope_store
    assert k.gate_up_silu is not None and k.rms_norm is compiled_functions()["rms_norm"]
    assert llm.runner.graphs is not None and llm.overlapped is not None
    eager = LLM(tiny_qwen3[0], enforce_eager=True, **small)
    assert eager.runner.kernels.rms_norm is rms_norm and eager.runner.graphs is None and eager.overlapped is None


def test_select_kernels_on_cuda_without_triton_skips_torch_compile_with_a_note(monkeypatch):
    """torch.compile's GPU code generator needs Triton: where it is missing the engine keeps the plain functions
    and says why, rather than failing at its first compiled call.  (Building the selection touches no GPU.)"""
    from nanovllm import kernels
    from nanovllm.kernels import compiled_functions

    cuda = torch.device("cuda")
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    k = select_kernels("torch", cuda, torch.bfloat16, enforce_eager=False)
    assert k.rms_norm is compiled_functions()["rms_norm"]  # with Triton: compiled
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.warns(UserWarning, match="torch.compile skipped.*pip install triton"):
        k = select_kernels("torch", cuda, torch.bfloat16, enforce_eager=False)
    assert k.rms_norm is rms_norm and k.silu_and_mul is silu_and_mul
