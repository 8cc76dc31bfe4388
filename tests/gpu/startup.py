"""Start-up of a notebook's engine on a GPU: the embedded SmolLM2 as chapter 00 makes it
(``LLM(max_num_seqs=32, max_model_len=1024)``), cold (the first engine in this process: compiles, captures) and
warm (the next ones, which reuse the compiled artefacts), and the CUDA memory each leaves behind after ``del``::

    PYTHONPATH=. python3 tests/gpu/startup.py [--engines 3]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from nanovllm import LLM, SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", type=int, default=3)
    args = ap.parse_args()
    base = torch.cuda.memory_allocated()
    for i in range(args.engines):
        t = time.perf_counter()
        llm = LLM(max_num_seqs=32, max_model_len=1024)
        wall = time.perf_counter() - t
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        held = torch.cuda.memory_allocated() - base
        print(f"engine {i} ({'cold' if i == 0 else 'warm'}): LLM() {wall:.2f} s (startup_seconds "
              f"{llm.startup_seconds:.2f}); holds {held / 2**20:.0f} MiB; {out[0].text!r}", flush=True)
        del llm, out
        left = torch.cuda.memory_allocated() - base
        gc.collect()
        print(f"  after del: {left / 2**20:.1f} MiB still allocated "
              f"({(torch.cuda.memory_allocated() - base) / 2**20:.1f} MiB after gc.collect())", flush=True)


if __name__ == "__main__":
    main()
