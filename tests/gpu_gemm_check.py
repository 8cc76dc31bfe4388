"""Time the decode GEMMs of Qwen3-0.6B (bf16, y = x @ W.T) on a GPU for the batch sizes decode meets,
with each BLAS library torch offers (a script, not a pytest module).

    python tests/gpu_gemm_check.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
          "lm_head": (151936, 1024)}


def main():
    dev, dt = "cuda", torch.bfloat16
    weights = {k: torch.randn(n, kk, device=dev, dtype=dt) * 0.02 for k, (n, kk) in SHAPES.items()}
    for lib in ("default", "cublas", "cublaslt"):
        if lib != "default":
            try:
                torch.backends.cuda.preferred_blas_library(lib)
            except Exception as e:  # noqa: BLE001
                print(f"{lib}: unavailable ({e})")
                continue
        for m in (1, 8, 32, 64, 128, 256):
            parts = []
            layer_us = 0.0
            for name, w in weights.items():
                x = torch.randn(m, w.shape[1], device=dev, dtype=dt)
                us = do_bench(lambda x=x, w=w: F.linear(x, w), warmup=20, rep=100) * 1e3
                if name != "lm_head":
                    layer_us += us
                tbs = w.numel() * 2 / us / 1e6
                parts.append(f"{name} {us:6.1f} us ({tbs:4.2f} TB/s)")
            print(f"{lib:>8} M={m:>3}: layer GEMMs {layer_us:6.1f} us | " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
