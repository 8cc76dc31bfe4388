"""Import a chapter's from-scratch definitions into a test, so book and package cannot drift apart.

A chapter marks the code cells that define its from-scratch pieces with the cell tag ``export``; this
module executes just those cells, in order, into a fresh module.
"""

from __future__ import annotations

import json
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
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{path.name}:export", "exec"), module.__dict__)
    return module
