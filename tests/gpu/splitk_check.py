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
* ``split S BMxBNxBK``: the package's split-K kernel (``nanovllm/layers/triton_gemm.py``: ``splitk_gemm``) with
  these settings, or with ``splitk_config``'s, alone and ``+ sum-add-norm``: with ``sum_add_rms_norm`` after it.
  (Section 19's timings were made with this script's own first copy of the two kernels, the same algorithm.)
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from gemm_check import LAYERS, graph_us  # noqa: E402

from nanovllm.kernels import compiled_functions  # noqa: E402
from nanovllm.layers.norm import add_rms_norm  # noqa: E402
from nanovllm.layers.triton_gemm import splitk_config, splitk_gemm, sum_add_rms_norm  # noqa: E402

PROJ = {"o": (1024, 2048), "down": (1024, 3072)}  # (N, K)
EPS = 1e-6


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

    def cublas(add_norm: bool):
        for w in ws:
            y = F.linear(x, w)
            if add_norm:
                compiled_add_norm(y, res, norm_w, EPS)

    def split(cfg, add_norm: bool):
        for w in ws:
            y = splitk_gemm(x, w, **cfg)
            if add_norm:
                sum_add_rms_norm(y, res, norm_w, EPS)

    base = graph_us(lambda: cublas(False))
    base_norm = graph_us(lambda: cublas(True))
    ref_out, ref_res = add_rms_norm(F.linear(x, ws[0]), res, norm_w, EPS)
    bm = min(max(16, triton.next_power_of_2(m)), 64)
    configs = [dict(splits=s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=st, num_warps=4)
               for s in (1, 2, 4, 8) for bn in (32, 64) for bk, st in ((128, 3), (64, 4)) if k % (s * bk) == 0]
    configs.append({})  # the package's choice (splitk_config)
    best = {}
    for cfg in configs:
        label = (f"split {cfg['splits']} {bm}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} st{cfg['num_stages']}" if cfg
                 else f"splitk_config's {splitk_config(m, k)}")
        try:
            out, res_out = sum_add_rms_norm(splitk_gemm(x, ws[0], **cfg), res, norm_w, EPS)
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
