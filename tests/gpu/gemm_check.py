"""Time the decode GEMMs of Qwen3-0.6B (bf16, y = x @ W.T) on a GPU for the batch sizes decode meets
(a script, not a pytest module).

    PYTHONPATH=. python3 tests/gpu/gemm_check.py            # each BLAS library torch offers
    PYTHONPATH=. python3 tests/gpu/gemm_check.py --triton   # cuBLAS vs the Triton skinny GEMM's tile settings

``--triton`` times as decode runs them: inside a CUDA graph, 28 layers' weights in turn (so no weight
sits in L2 from the call before), per GEMM; the down projection also with SwiGLU's activation folded in
(``act="silu_mul"``) against the compiled activation kernel followed by cuBLAS.  ``decode_sweep.py --graph``
times decode attention with this file's ``graph_us``.  (Results of past runs, and the tile table they chose:
figures/data/kernel_measurements.md.)
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
          "lm_head": (151936, 1024)}
LAYERS = 28


def blas_libraries():
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


def chain(ws, call):
    """One call per layer's weight, in turn."""
    def run():
        for w in ws:
            call(w)
    return run


def graph_us(fn, reps: int = 20) -> float:
    """Microseconds per call of ``fn`` (one call = all layers) replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / LAYERS


def triton_sweep(ms: list[int]):
    from nanovllm.layers.activation import silu_and_mul
    from nanovllm.layers.triton_gemm import default_config, skinny_gemm

    dev, dt = "cuda", torch.bfloat16
    act = torch.compile(silu_and_mul, dynamic=True)
    rows = []
    for name in ("qkv", "o", "gate_up", "down"):
        n, k = SHAPES[name]
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)]
        for m in ms:
            fused = name == "down"
            x = torch.randn(m, 2 * k if fused else k, device=dev, dtype=dt)
            y = torch.empty(m, n, device=dev, dtype=dt)
            xa = act(x) if fused else x
            a = "silu_mul" if fused else None
            ref = F.linear(xa, ws[0])

            cublas = chain(ws, lambda w, xa=xa, y=y: torch.matmul(xa, w.t(), out=y))
            cublas_act = chain(ws, lambda w, x=x, y=y: torch.matmul(act(x), w.t(), out=y))
            base = graph_us(cublas)
            line = f"{name:>7} M={m:>3}: cuBLAS {base:6.2f} us"
            if fused:
                line += f" (+ activation kernel: {graph_us(cublas_act):6.2f})"
            bm0 = default_config(m)["BLOCK_M"]
            best = None
            for bm, bn, bk, st, nw in itertools.product(sorted({bm0, 128 if m >= 128 else bm0}), (16, 32, 64, 128),
                                                        (128, 256), (3, 4), (4,)):
                nw = 8 if bm == 128 else nw
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=st, num_warps=nw)
                try:
                    got = skinny_gemm(x, ws[0], a, **cfg)
                    torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)
                    us = graph_us(chain(ws, lambda w, x=x, y=y, a=a, cfg=cfg: skinny_gemm(x, w, a, out=y, **cfg)))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"  {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
                    continue
                rows.append((name, m, bm, bn, bk, st, nw, us, base))
                if best is None or us < best[0]:
                    best = (us, cfg)
            dflt = graph_us(chain(ws, lambda w, x=x, y=y, a=a: skinny_gemm(x, w, a, out=y)))
            line += f" | triton default {dflt:6.2f} us {default_config(m)} | best {best[0]:6.2f} us {best[1]}"
            print(line, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton", action="store_true")
    ap.add_argument("--ms", default="1,16,64,128,256")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.triton:
        blas_libraries()
        return
    rows = triton_sweep([int(m) for m in args.ms.split(",")])
    if args.out:
        with open(f"{args.out}/gemm_sweep.csv", "w") as f:
            f.write("gemm,m,block_m,block_n,block_k,stages,warps,us,cublas_us\n")
            for r in rows:
                f.write(",".join(str(round(v, 3)) if isinstance(v, float) else str(v) for v in r) + "\n")


if __name__ == "__main__":
    main()
