"""An experiment: the decode projections that end in the hidden size (o: K 2048, down: K 3072; N 1024), split
along K into fp32 partials, with the partials' sum folded into the residual add + RMSNorm that follows them.

Why: a layer's four decode GEMMs take 27-33 us at any batch from 37 to 218 rows, 2-3x what their 31.5 MB take
at DRAM speed, and as long with their weights in L2 as cold (``figures/data/fp8_words_h100.txt`` sections 16-17):
they are bound by their K loops and launches, not by bytes or rows.  o and down have only N = 1024 columns, so a
tile grid of 64 columns has 16 column stripes: few programs, each with a long K loop.  Split along K, the
programs multiply by the split count and each loop shortens; the partials (S x M x 1024 floats, in L2) are summed
by the kernel that comes next anyway, the residual add + RMSNorm, so the split costs no kernel of its own.

What it times (us a layer: 28 layers, each its own weights, replayed from a CUDA graph), per row count:
* ``cuBLAS``: ``F.linear``; ``cuBLAS + add-norm``: then the compiled ``add_rms_norm`` (what the engine does);
* ``split S BMxBNxBK``: the split-K kernel alone, and ``+ sum-add-norm``: with the fused sum, add and norm.
It checks the fused path's outputs (the normed rows and the new residual) against cuBLAS + ``add_rms_norm``.

    PYTHONPATH=. python3 tests/gpu/splitk_check.py [--rows 224,48]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from gemm_check import LAYERS, graph_us  # noqa: E402

from nanovllm.kernels import compiled_functions  # noqa: E402
from nanovllm.layers.norm import add_rms_norm  # noqa: E402

PROJ = {"o": (1024, 2048), "down": (1024, 3072)}  # (N, K)
EPS = 1e-6


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, part_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[s, m, n] = x[m, ks] @ w[n, ks].T over split s's ``K_PER_SPLIT`` columns (a multiple of BLOCK_K)."""
    pid_n, pid_m, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_first = s * K_PER_SPLIT
    for k0 in range(k_first, k_first + K_PER_SPLIT, BLOCK_K):
        a = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        b = tl.load(w_rows + (k0 + offs_k)[None, :])
        acc += tl.dot(a, tl.trans(b))
    tl.store(part_ptr + (s * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _sum_add_norm_kernel(part_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, M, eps,
                         N: tl.constexpr, S: tl.constexpr):
    """Row m: y = the partials' sum, rounded as the GEMM stores it; h = y + residual (rounded); the new residual
    h, and rms_norm(h) * weight, rounded as ``add_rms_norm`` rounds them."""
    m = tl.program_id(0)
    offs = tl.arange(0, N)
    y = tl.zeros([N], tl.float32)
    for s in tl.static_range(S):
        y += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + offs)
    dt = res_ptr.dtype.element_ty
    h = (y.to(dt).to(tl.float32) + tl.load(res_ptr + m.to(tl.int64) * N + offs).to(tl.float32)).to(dt)
    tl.store(res_out_ptr + m.to(tl.int64) * N + offs, h)
    hf = h.to(tl.float32)
    normed = (hf * tl.rsqrt(tl.sum(hf * hf, 0) / N + eps)).to(dt)
    out = normed.to(tl.float32) * tl.load(w_ptr + offs).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * N + offs, out.to(dt))


def splitk(x, w, part, splits, bm, bn, bk, stages, warps):
    m, k = x.shape
    n = w.shape[0]
    assert k % (splits * bk) == 0
    _splitk_kernel[(n // bn, triton.cdiv(m, bm), splits)](
        x, w, part, m, n, k, k // splits, x.stride(0), w.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps)


def sum_add_norm(part, res, weight, out, res_out, splits):
    m, n = res.shape
    _sum_add_norm_kernel[(m,)](part, res, weight, out, res_out, m, EPS, N=n, S=splits, num_warps=4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="224,48")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in PROJ.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(LAYERS)]
        norm_w = torch.rand(n, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5
        for m in map(int, args.rows.split(",")):
            time_rows(name, ws, norm_w, m, g)
            torch.cuda.empty_cache()


def time_rows(name, ws, norm_w, m, g) -> None:
    n, k = ws[0].shape
    compiled_add_norm = compiled_functions()["add_rms_norm"]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
    out, res_out = torch.empty_like(res), torch.empty_like(res)
    part = torch.empty(8 * m * n, device="cuda", dtype=torch.float32)

    def cublas(add_norm: bool):
        for w in ws:
            y = F.linear(x, w)
            if add_norm:
                compiled_add_norm(y, res, norm_w, EPS)

    def split(cfg, add_norm: bool):
        for w in ws:
            splitk(x, w, part, *cfg)
            if add_norm:
                sum_add_norm(part, res, norm_w, out, res_out, cfg[0])

    base = graph_us(lambda: cublas(False))
    base_norm = graph_us(lambda: cublas(True))
    ref_out, ref_res = add_rms_norm(F.linear(x, ws[0]), res, norm_w, EPS)
    bm = min(max(16, triton.next_power_of_2(m)), 64)
    configs = [(s, bm, bn, bk, st, 4) for s in (1, 2, 4, 8) for bn in (32, 64)
               for bk, st in ((128, 3), (64, 4)) if k % (s * bk) == 0]
    best = {}
    for cfg in configs:
        s, bm, bn, bk, st, _ = cfg
        label = f"split {s} {bm}x{bn}x{bk} st{st}"
        try:
            splitk(x, ws[0], part, *cfg)
            sum_add_norm(part, res, norm_w, out, res_out, s)
            err = max((out.float() - ref_out.float()).abs().max().item(),
                      (res_out.float() - ref_res.float()).abs().max().item())
            best[label] = (graph_us(functools.partial(split, cfg, True)),
                           graph_us(functools.partial(split, cfg, False)), err)
        except Exception as e:  # noqa: BLE001 (a tile that does not fit: say so, go on)
            print(f"  {label}: {type(e).__name__}: {str(e)[:100]}")
    print(f"{name} (N {n}, K {k}) at {m} rows: cuBLAS {base:.1f} us, cuBLAS + add-norm {base_norm:.1f}", flush=True)
    for label, (both, alone, err) in sorted(best.items(), key=lambda kv: kv[1][0])[:6]:
        print(f"    {both:6.1f}  {label} + sum-add-norm ({alone:.1f} alone; max |diff| {err:.4f})", flush=True)


if __name__ == "__main__":
    main()
