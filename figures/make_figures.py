"""Regenerate every committed figure: runs each figures/fig_*.py script, in name order.

    python figures/make_figures.py            # all of them
    python figures/make_figures.py 02 05      # only the scripts whose names contain "02" or "05"

Each script reads its data from figures/data/ (or from code the repo holds, such as the seed benchmark's
length distribution in nanovllm/bench.py) and writes figures/<its name>.png.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("fig_*.py"))
    if argv:
        scripts = [s for s in scripts if any(a in s.stem for a in argv)]
    failed = []
    for script in scripts:
        t = time.perf_counter()
        result = subprocess.run([sys.executable, str(script)], cwd=HERE.parent)
        status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
        print(f"{script.name:40s} {status} in {time.perf_counter() - t:.1f} s", flush=True)
        if result.returncode:
            failed.append(script.name)
    if failed:
        print(f"{len(failed)} of {len(scripts)} figure scripts failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
