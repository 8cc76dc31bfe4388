"""Measure prefill time with prefix caching on and off; adds rows to fig_04_prefix_caching.csv beside this file.

Run by hand (a few minutes on a CPU)::

    python figures/data/measure_prefix_caching.py                       # the embedded model, here
    python figures/data/measure_prefix_caching.py --model DIR --dummy   # DIR's config, random weights

Workload, as in chapter 04: 6 requests that share a prefix of P random tokens, each followed by its own 16
tokens; the first request is served alone, then the other five together; max_tokens=1, so only prefill steps
run.  The caching engine forgets its cache before each round.  Best of 5 rounds after a warm-up.  Timing does
not depend on the weights, so random ones (--dummy) measure the same thing where the model files are absent.
"""

from __future__ import annotations

import argparse
import csv
import platform
import random
import time
from pathlib import Path

import torch

from nanovllm import LLM, SamplingParams

PREFIXES = (0, 64, 128, 256, 512, 1024)
NUM_REQUESTS, QUESTION, ROUNDS = 6, 16, 5
OUT = Path(__file__).resolve().parent / "fig_04_prefix_caching.csv"
FIELDS = ["device", "shared_prefix_tokens", "question_tokens", "num_requests", "prefix_caching", "seconds",
          "hit_tokens", "queried_tokens"]


def serve(engine, prompts, cuda):
    bm = engine.block_manager
    engine.reset_prefix_cache()
    hits, queried = bm.hit_tokens, bm.queried_tokens
    one = SamplingParams(temperature=0, max_tokens=1)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    engine.generate(prompts[:1], one, use_tqdm=False)
    engine.generate(prompts[1:], one, use_tqdm=False)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, bm.hit_tokens - hits, bm.queried_tokens - queried


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + " CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--dummy", action="store_true", help="random weights from the model's config")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = NUM_REQUESTS * (max(PREFIXES) + QUESTION + 32) // 16
    engines = {on: LLM(args.model, device=args.device, num_kvcache_blocks=blocks, enable_prefix_caching=on,
                       load_format="dummy" if args.dummy else "auto") for on in (False, True)}
    dev = engines[True].device
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else f"{cpu_name()}, {torch.get_num_threads()} threads"
    rng = random.Random(0)
    rows = []
    for p in PREFIXES:
        prefix = [rng.randrange(1000, 40000) for _ in range(p)]
        prompts = [prefix + [rng.randrange(1000, 40000) for _ in range(QUESTION)] for _ in range(NUM_REQUESTS)]
        for on, engine in engines.items():
            serve(engine, prompts, cuda)  # warm-up
            runs = [serve(engine, prompts, cuda) for _ in range(ROUNDS)]
            rows.append(dict(device=name, shared_prefix_tokens=p, question_tokens=QUESTION,
                             num_requests=NUM_REQUESTS, prefix_caching="on" if on else "off",
                             seconds=f"{min(r[0] for r in runs):.4f}", hit_tokens=runs[-1][1],
                             queried_tokens=runs[-1][2]))
            print(rows[-1], flush=True)
    new = not args.out.exists()
    with args.out.open("a", newline="") as f:
        if new:
            f.write(f"# Written by measure_prefix_caching.py (best of {ROUNDS} rounds; see its docstring).\n")
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
