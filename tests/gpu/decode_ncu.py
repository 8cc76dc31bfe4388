"""Nsight Compute's view of the decode-attention kernel (a script, not a pytest module).

    PYTHONPATH=. python3 tests/gpu/decode_ncu.py [--out DIR] [--step 200]

Profiles one launch of ``paged_decode_attention`` as ``TritonBackend`` makes it over an FP8 cache (float16
products, K and V read as 16-bit words) and one over a bfloat16 cache, on the seed benchmark's batch at decode
step ``--step`` (one layer of Qwen3-0.6B, the batch's blocks consecutive as in ``decode_sweep.py --graph``), with
``ncu --set full``: where the warps stall, how busy the pipes and shared memory are, shared-memory bank
conflicts.  What the instruction counts of ``tests/ptx_ops.py --sass`` cannot say: which of them the kernel
waits on.  Without ``ncu`` on this machine (PATH, then the CUDA toolkits' usual folders) it says so and exits
0.  ``--out``: each report's text, ``decode_ncu_<cache>.txt``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
H, HKV, D, BS = 16, 8, 128, 16  # Qwen3-0.6B's heads, blocks of 16 (as decode_sweep.py)


def find_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for pattern in (f"{home}/bin/ncu", "/usr/local/cuda*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def launch(cache: str, step: int) -> None:
    """The profiled process: three launches (the first compiles; ncu is told to skip two)."""
    sys.path.insert(0, ROOT)
    import torch

    sys.path.insert(0, HERE)
    from decode_sweep import batch_at_step, consecutive_tables

    from nanovllm.attention import triton_kernels as tk
    from nanovllm.bench import seed_workload

    ctx = batch_at_step(seed_workload(), step)
    per_seq = [-(-c // BS) for c in ctx]
    k = torch.randn(sum(per_seq) + 8, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kw = {}
    if cache == "fp8":
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        ones = torch.ones(HKV, device="cuda")
        kw = dict(k_scale=ones, v_scale=ones, f16_dot=True, fp8_words=tk.TritonBackend.fp8_words,
                  fp8_words_k=tk.TritonBackend.fp8_words_k)
    tables = consecutive_tables(per_seq, len(ctx))
    lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(len(ctx), H, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        tk.paged_decode_attention(q, k, v, tables, lens, D ** -0.5, **kw)
    torch.cuda.synchronize()
    print(f"{cache}: batch {len(ctx)}, {sum(ctx)} tokens of context", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--step", type=int, default=200)
    ap.add_argument("--launch", choices=("fp8", "bf16"), help=argparse.SUPPRESS)  # the profiled child
    args = ap.parse_args()
    if args.launch:
        launch(args.launch, args.step)
        return
    ncu = find_ncu()
    if ncu is None:
        print("no ncu (Nsight Compute) on this machine: nothing profiled")
        return
    print(f"ncu: {ncu}")
    for cache in ("fp8", "bf16"):
        cmd = [ncu, "--set", "full", "--import-source", "no", "--kernel-name", "_decode_split_kernel",
               "--launch-skip", "2", "--launch-count", "1", sys.executable, os.path.abspath(__file__),
               "--launch", cache, "--step", str(args.step)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        text = r.stdout + r.stderr
        print(f"===== {cache} (ncu exit {r.returncode}) =====\n{text[-20000:]}", flush=True)
        if args.out:
            Path(args.out, f"decode_ncu_{cache}.txt").write_text(text)


if __name__ == "__main__":
    main()
