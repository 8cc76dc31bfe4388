"""What the GPU check scripts share (fp8_check.py, fa4_check.py): run each section, print PASS or FAIL with its
numbers as soon as it ends, and keep going after a failure."""

from __future__ import annotations

import time
import traceback

import torch

FAILS: list[str] = []  # the sections that failed
RESULTS: list[dict] = []  # one entry per section: its name and numbers ({"failed": True} for a failure)


def section(name, fn, *args):
    t = time.perf_counter()
    try:
        numbers = fn(*args) or {}
    except Exception:
        FAILS.append(name)
        print(f"FAIL {name} ({time.perf_counter() - t:.1f} s)\n{traceback.format_exc()}", flush=True)
        numbers = {"failed": True}
    else:
        print(f"PASS {name} ({time.perf_counter() - t:.1f} s): "
              + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()),
              flush=True)
    RESULTS.append({"section": name, **numbers})
    torch.cuda.empty_cache()
