"""A chapter's code cells run as one script, for a GPU machine whose notebook tools are not installed (not collected
by pytest; the book's own GPU run is nbval through the GPU notes' book.sh, which needs their two calls).

    PYTHONPATH=. python3 tests/gpu/chapter_cells.py 08 [01 ...]

Every code cell runs in order in one namespace, from chapters/ (as Jupyter runs it), its printed output captured.
For each cell: whether it ran, and, for a cell nbval checks (``# NBVAL_CHECK_OUTPUT``), whether its output equals
the stored one (the stored outputs come from a CPU run: a cell that prints device-dependent text differs without
failing, as nbval would not let it; nbval's run on the GPU decides). Exits 1 if a cell raised.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_chapter(prefix: str) -> bool:
    [path] = sorted((ROOT / "chapters").glob(f"{prefix}*.ipynb"))
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__main__"}
    os.chdir(path.parent)
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        stored = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o["output_type"] == "stream")
        out, name = io.StringIO(), f"<{path.stem} code cell {i}>"
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)  # as Jupyter: Triton reads kernels' source
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                exec(compile(src, name, "exec"), namespace)
        except BaseException:  # noqa: BLE001  # a cell's SystemExit or error: report it, stop this chapter
            print(f"{path.stem} code cell {i}: FAIL\n{out.getvalue()[-2000:]}{traceback.format_exc()[-3000:]}",
                  flush=True)
            return False
        checked = src.lstrip().startswith("# NBVAL_CHECK_OUTPUT")
        same = out.getvalue() == stored
        print(f"{path.stem} code cell {i}: ran" + (f", output {'as stored' if same else 'DIFFERS'}" if checked else ""),
              flush=True)
        if checked and not same:
            print("  got:\n    " + out.getvalue()[-1500:].replace("\n", "\n    "), flush=True)
    return True


def main():
    sys.path.insert(0, str(ROOT))
    results = [run_chapter(p) for p in sys.argv[1:] or ["08"]]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
