"""Import a chapter's from-scratch definitions into a test, so book and package cannot drift apart.

A chapter marks the code cells that define its from-scratch pieces with the cell tag ``export``; this
module executes just those cells, in order, into a fresh module.
"""

from __future__ import annotations

import json
import linecache
import types
from pathlib import Path

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"


def load_chapter(name: str) -> types.ModuleType:
    """``load_chapter("03_paged_kv")``: a module holding the chapter's exported definitions."""
    path = CHAPTERS / (name if name.endswith(".ipynb") else name + ".ipynb")
    nb = json.loads(path.read_text())
    module = types.ModuleType(f"chapter_{path.stem}")
    module.__file__ = str(path)
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "export" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{path.name} has no code cells tagged 'export'")
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        filename = f"{path.name}:export[{i}]"
        # registered like a file, so that inspect finds the source: Triton's JIT compiles a kernel from it
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), module.__dict__)
    return module
