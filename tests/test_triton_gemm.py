"""The Triton skinny GEMM (layers/triton_gemm.py) against torch: the plain product, the fused gate-up +
SiLU-and-mul, odd sizes, and the MLP's fused path against its step-by-step one.  Without a GPU the kernel
runs in Triton's interpreter on the CPU (float32); with one, on the GPU (float32, exact products)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is defined

pytest.importorskip("triton")
triton_gemm = importlib.import_module("nanovllm.layers.triton_gemm")
if DEV == "cpu" and type(triton_gemm._skinny_gemm_kernel).__name__ != "InterpretedFunction":
    triton_gemm = importlib.reload(triton_gemm)  # imported earlier without the interpreter
skinny_gemm, default_config = triton_gemm.skinny_gemm, triton_gemm.default_config


def randn(*shape, generator, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(DEV)


@pytest.mark.parametrize("m,n,k,block_k", [(1, 64, 96, 32), (5, 48, 128, 64), (33, 40, 80, 32), (17, 16, 64, 64)])
def test_plain_product(m, n, k, block_k):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = randn(m, k, generator=g), randn(n, k, generator=g)
    torch.testing.assert_close(skinny_gemm(x, w, BLOCK_K=block_k, BLOCK_N=16), x @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m,inter,k", [(1, 32, 96), (7, 24, 128), (20, 40, 80)])
def test_gate_up_silu_mul(m, inter, k):
    """W holds the gate rows, then the up rows: the result is silu_and_mul(x @ W.T)."""
    g = torch.Generator().manual_seed(m + inter)
    x, w = randn(m, k, generator=g), randn(2 * inter, k, generator=g, scale=0.2)
    gate, up = (x @ w.T).chunk(2, -1)
    out = skinny_gemm(x, w, "silu_mul", BLOCK_K=32, BLOCK_N=16)
    assert out.shape == (m, inter)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=1e-4, rtol=1e-4)


def test_out_buffer_and_empty_batch():
    g = torch.Generator().manual_seed(0)
    x, w = randn(3, 32, generator=g), randn(16, 32, generator=g)
    out = torch.full((3, 16), float("nan"), device=DEV)
    assert skinny_gemm(x, w, out=out, BLOCK_N=16, BLOCK_K=32) is out
    torch.testing.assert_close(out, x @ w.T, atol=1e-4, rtol=1e-4)
    assert skinny_gemm(torch.randn(0, 32, device=DEV), w).shape == (0, 16)


def test_bad_input_is_named():
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match="act"):
        skinny_gemm(torch.randn(2, 32), w, act="gelu")
    with pytest.raises(ValueError, match="columns"):
        skinny_gemm(torch.randn(2, 31), w)
    with pytest.raises(ValueError, match="even"):
        skinny_gemm(torch.randn(2, 32), torch.randn(15, 32), act="silu_mul")
    with pytest.raises(ValueError, match="dtype"):
        skinny_gemm(torch.randn(2, 32, dtype=torch.float64), w)


def test_tile_table_covers_every_batch():
    prev = 0
    for m in (1, 16, 17, 64, 100, 128, 129, 256, 4096):
        cfg = default_config(m)
        assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_M"] >= min(m, 16)
        assert cfg["BLOCK_M"] >= prev or m > 128  # row tiles grow with the batch
        prev = cfg["BLOCK_M"]


def test_mlp_fused_path_equals_step_by_step():
    """The model's MLP with the fused kernel plugged in (as the runner does on CUDA) gives what its
    gate-up GEMM + SiLU-and-mul + down GEMM give."""
    import functools
    from types import SimpleNamespace

    from nanovllm.kernels import Kernels
    from nanovllm.models.llama import MLP

    cfg = SimpleNamespace(hidden_size=64, intermediate_size=48, hidden_act="silu")
    mlp = MLP(cfg, Kernels()).to(DEV)
    fused_kernels = Kernels(gate_up_silu=functools.partial(skinny_gemm, act="silu_mul"))
    mlp_fused = MLP(cfg, fused_kernels).to(DEV)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(randn(*p.shape, generator=g, scale=0.1))
        mlp_fused.load_state_dict(mlp.state_dict())
        x = randn(9, 64, generator=g)
        ref = mlp(x)
        fused = mlp_fused(x)
        big = randn(fused_kernels.gate_up_silu_max_rows + 1, 64, generator=g)  # past the fused rows: cuBLAS
        torch.testing.assert_close(mlp_fused(big), mlp(big))
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
