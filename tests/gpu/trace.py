"""Where the GPU sits idle during overlapped decode (a script, not a pytest module).

    PYTHONPATH=. python3 tests/gpu/trace.py [--out DIR] [--kv-cache-dtype fp8] [--block-size N]

Runs a few short seed-benchmark-like decodes (Qwen3-0.6B shape, random weights) under the PyTorch
profiler, then from the kernel timeline of the decode steps: GPU busy time, idle time, and the idle gaps
summed by the pair of kernels around them (the gap before a graph's first kernel is host time), and the busy
time of each kernel.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.bench import QWEN3_0_6B_CONFIG  # noqa: E402


def short(name: str) -> str:
    return name.split("(")[0].replace("void ", "")[:48]


def analyse(trace_path: Path, label: str) -> None:
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                 key=lambda e: e["ts"])
    last_prefill = max((e["ts"] + e["dur"] for e in gpu if "prefill" in e["name"]), default=gpu[0]["ts"])
    dec = [e for e in gpu if e["ts"] > last_prefill]
    start, end = dec[0]["ts"], max(e["ts"] + e["dur"] for e in dec)
    busy, cur_end = 0.0, start
    gaps = collections.defaultdict(lambda: [0.0, 0])
    prev = None
    for e in dec:
        s, t = e["ts"], e["ts"] + e["dur"]
        if s > cur_end and prev is not None:
            key = f"{short(prev['name'])} -> {short(e['name'])}"
            gaps[key][0] += s - cur_end
            gaps[key][1] += 1
        busy += max(0.0, t - max(s, cur_end))
        cur_end = max(cur_end, t)
        prev = e
    steps = sum(1 for e in dec if "gumbel" in e["name"]) or 1
    window = end - start
    print(f"[{label}] decode window {window / 1e3:.1f} ms over ~{steps} steps: {window / steps:.0f} us/step, "
          f"GPU busy {busy / steps:.0f} us/step, idle {(window - busy) / steps:.0f} us/step, "
          f"{len(dec) / steps:.0f} GPU ops/step")
    for key, (total, count) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"    idle {total / steps:7.1f} us/step  ({count / steps:5.1f}x/step)  {key}")
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in dec:
        entry = kernels[short(e["name"])]
        entry[0] += e["dur"]
        entry[1] += 1
    for key, (total, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"    busy {total / steps:7.1f} us/step  ({count / steps:5.1f}x/step, {total / count:6.1f} us each)  "
              f"{key}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--block-size", type=int, default=None, help="the KV cache's block size (default: the engine's)")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    tmp = tempfile.mkdtemp()
    (Path(tmp) / "config.json").write_text(QWEN3_0_6B_CONFIG.read_text())
    blocks = {} if args.block_size is None else {"kvcache_block_size": args.block_size}
    llm = LLM(tmp, load_format="dummy", kv_cache_dtype=args.kv_cache_dtype, **blocks)
    print(f"kv_cache_dtype={args.kv_cache_dtype} {blocks}")
    for num, prompt_len, max_tokens in ((16, 1500, 48), (64, 1000, 40), (256, 600, 32)):
        prompts = [[(7 * i + j) % 10000 for j in range(prompt_len)] for i in range(num)]
        params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens)
        llm.generate(prompts, params, use_tqdm=False)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
        path = Path(tmp) / f"trace_{num}.json"
        prof.export_chrome_trace(str(path))
        analyse(path, f"batch {num}, context ~{prompt_len}")
        if args.out:
            with gzip.open(Path(args.out) / f"trace_{num}.json.gz", "wt") as f:
                f.write(path.read_text())
    llm.shutdown()


if __name__ == "__main__":
    main()
