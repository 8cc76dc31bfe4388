"""The Triton skinny GEMM (layers/triton_gemm.py) against torch: the plain product, the fused gate-up +
SiLU-and-mul, odd sizes, and the MLP's fused path against its step-by-step one; the split-K GEMM and the
residual add + RMSNorm that sums its parts, against the product and ``add_rms_norm``, and a model with them
against the reference model.  Without a GPU the kernel
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
splitk_gemm, sum_add_rms_norm = triton_gemm.splitk_gemm, triton_gemm.sum_add_rms_norm


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


@pytest.mark.parametrize("m,n,k", [(1, 64, 2048), (20, 48, 576), (70, 40, 3072), (3, 16, 200)])
@pytest.mark.parametrize("splits", [None, 1, 2, 4])
def test_splitk_parts_sum_to_the_product(m, n, k, splits):
    """The parts along K add up to x @ w.T, for split counts chosen (None: ``splitk_config``) or given, K that
    the splits and tiles divide (2048, 3072) and K they do not (576, 200)."""
    g = torch.Generator().manual_seed(m * 7 + k)
    x, w = randn(m, k, generator=g), randn(n, k, generator=g, scale=0.05)
    cfg = {} if splits is None else dict(splits=splits)
    y = splitk_gemm(x, w, BLOCK_N=16, BLOCK_K=64, **cfg)
    assert y.parts.shape == (splits or triton_gemm.splitk_config(m, k)["splits"], m, n)
    assert y.dtype == x.dtype and y.parts.dtype == torch.float32
    torch.testing.assert_close(y.total(), x @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sum_add_rms_norm_is_add_rms_norm_of_the_sum(dtype):
    """One kernel: the parts' sum rounded as the GEMM stores it, the residual added, the RMSNorm, each rounded as
    ``add_rms_norm`` rounds it; a hidden size that is not a power of two."""
    from nanovllm.layers.linear import SplitK
    from nanovllm.layers.norm import add_rms_norm

    g = torch.Generator().manual_seed(5)
    y = SplitK(randn(3, 7, 96, generator=g), dtype)
    residual, weight = randn(7, 96, generator=g).to(dtype), (randn(96, generator=g) * 0.1 + 1).to(dtype)
    out, res = sum_add_rms_norm(y, residual, weight, 1e-6)
    ref_out, ref_res = add_rms_norm(y.total(), residual, weight, 1e-6)
    assert out.dtype == res.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(res, ref_res, **tol)
    torch.testing.assert_close(out, ref_out, **tol)


def test_splitk_bad_input_is_named():
    from nanovllm.layers.linear import SplitK

    with pytest.raises(ValueError, match="agree in K"):
        splitk_gemm(torch.randn(2, 32), torch.randn(16, 31))
    with pytest.raises(ValueError, match="share a dtype"):
        splitk_gemm(torch.randn(2, 32), torch.randn(16, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual must be a contiguous"):
        sum_add_rms_norm(SplitK(torch.zeros(2, 3, 8), torch.float32), torch.zeros(3, 9), torch.ones(8), 1e-6)


def test_splitk_config_is_the_timed_one():
    """tests/gpu/splitk_check.py timed (on an H100) 4 splits of narrow tiles best at 48 rows and 2 of wider ones at
    224, for o (K 2048) and down (K 3072); every split a whole number of K tiles there."""
    for k in (2048, 3072):
        few, many = triton_gemm.splitk_config(48, k), triton_gemm.splitk_config(224, k)
        assert (few["splits"], few["BLOCK_N"], many["splits"], many["BLOCK_N"]) == (4, 32, 2, 64)
        assert all(k % (c["splits"] * c["BLOCK_K"]) == 0 for c in (few, many))
    assert triton_gemm.splitk_config(1, 64)["splits"] == 1


def test_model_with_splitk_equals_the_reference(tiny_qwen3):
    """A model whose o and down projections leave partial sums, summed by the RMSNorms after them (as on CUDA
    with ``nanovllm.kernels.SPLITK_ADD_NORM``), gives the reference model's greedy tokens and logits; batches
    past ``splitk_max_rows`` take the plain product.  The same with the qkv projection in the skinny GEMM
    (``nanovllm.kernels.TRITON_QKV``), alone and with split-K."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine import model_runner
    from nanovllm.kernels import Kernels
    from nanovllm.layers.linear import QKVParallelLinear, RowParallelLinear

    def run(**fused):
        def select(*args, **kwargs):
            return Kernels(**fused)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model_runner, "select_kernels", select)
            llm = LLM(tiny_qwen3[0], device=DEV, dtype=torch.float32, enforce_eager=True, max_num_seqs=4,
                      max_model_len=128, num_kvcache_blocks=64)
        projs = [m for m in llm.runner.model.modules() if isinstance(m, RowParallelLinear | QKVParallelLinear)]
        prompts = [[5, 9, 2, 33, 7], [1, 2, 3], list(range(40, 75))]
        sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return projs, [o.token_ids for o in outs], [o.outputs[0].logprobs for o in outs]

    ref_projs, ref_tokens, ref_lp = run()
    assert all(p.triton_gemm is None for p in ref_projs)
    splitk = dict(splitk_gemm=splitk_gemm, sum_add_rms_norm=sum_add_rms_norm)
    for fused in (dict(splitk, splitk_max_rows=256), dict(splitk, splitk_max_rows=8),  # 8: the 35-token prefill
                  dict(qkv_gemm=skinny_gemm, qkv_gemm_max_rows=8),                     # past it, decode within
                  dict(splitk, splitk_max_rows=256, qkv_gemm=skinny_gemm, qkv_gemm_max_rows=64)):
        projs, tokens, lp = run(**fused)
        rows = [p for p in projs if isinstance(p, RowParallelLinear)]
        qkv = [p for p in projs if isinstance(p, QKVParallelLinear)]
        assert len(rows) == len(qkv) * 2 == 2 * 2
        assert all(p.triton_gemm is fused.get("splitk_gemm") for p in rows)
        assert all(p.triton_max_rows == fused["splitk_max_rows"] for p in rows if "splitk_gemm" in fused)
        assert all(p.triton_gemm is fused.get("qkv_gemm") for p in qkv)
        assert all(p.triton_max_rows == fused["qkv_gemm_max_rows"] for p in qkv if "qkv_gemm" in fused)
        assert tokens == ref_tokens
        for a, b in zip(lp, ref_lp):
            for sa, sb in zip(a, b):
                assert sa.keys() == sb.keys()
                assert all(abs(sa[t].logprob - sb[t].logprob) < 1e-3 for t in sa)
