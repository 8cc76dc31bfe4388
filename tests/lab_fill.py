"""The lab's "solutions filled in" run: a chapter with each exercise cell replaced by its solution block.

CI executes every chapter twice: as shipped (nbval: the exercises report "not attempted") and filled in here
(every exercise must report "correct"), so a solution that rots or a check that cannot pass is caught::

    python tests/lab_fill.py chapters/03_paged_kv.ipynb out.ipynb   # writes the filled-in, executed copy
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import nbformat

from nanovllm.lab import solution_blocks

STATUS = re.compile(r"^Exercise (\S+): (.*)$", re.MULTILINE)


def exercise_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and "exercise" in c.metadata.get("tags", [])]


def fill(nb, chapter: str):
    """A copy of ``nb`` whose exercise cells hold the solutions of ``chapter`` (``"03"``)."""
    blocks = solution_blocks(chapter)
    nb = copy.deepcopy(nb)
    for cell in exercise_cells(nb):
        key = str(cell.metadata.get("exercise"))
        if key not in blocks:
            raise KeyError(f"chapter {chapter}: exercise cell {key!r} has no solution block (has {list(blocks)})")
        cell.source = blocks[key]
    return nb


def statuses(nb) -> dict[str, str]:
    """``{exercise: status}`` from the printed lines ``Exercise N: status`` of an executed notebook."""
    found = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                found.update(STATUS.findall(out.get("text", "")))
    return found


def run_filled(path: Path, timeout: int = 1200):
    """Execute the filled-in copy of the chapter at ``path`` (in its own folder) and return it."""
    from nbclient import NotebookClient

    nb = fill(nbformat.read(path, as_version=4), path.stem[:2])
    resources = {"metadata": {"path": str(path.parent)}}  # the kernel runs in chapters/, as in JupyterLab
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources)
    client.execute()
    return nb


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    executed = run_filled(src)
    nbformat.write(executed, dst)
    for k, v in statuses(executed).items():
        print(f"exercise {k}: {v}")
