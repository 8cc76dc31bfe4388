"""Import a chapter's from-scratch definitions into a test, so book and package cannot drift apart.

A chapter marks the code cells that define its from-scratch pieces with the cell tag ``export``; this
module executes just those cells, in order, into a fresh module.

Build exercises (cells tagged ``exercise`` and ``build``, with the exercise's id in the cell metadata
``"exercise"``) plug the reader's code into the engine: ``load_chapter(name, code="notebook")`` runs the reader's
cells too, ``code="solutions"`` runs the solution blocks of ``chapters/solutions/`` in their place (the lab's
one-line swap between the reader's code and the reference, as in tiny-llm).
"""

from __future__ import annotations

import json
import linecache
import types
from pathlib import Path

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"


def load_chapter(name: str, code: str | None = None) -> types.ModuleType:
    """``load_chapter("03_paged_kv")``: a module holding the chapter's exported definitions; with ``code`` of
    ``"notebook"`` or ``"solutions"``, also its build exercises, the reader's or the solutions'."""
    if code not in (None, "notebook", "solutions"):
        raise ValueError(f"code must be None, 'notebook' or 'solutions', not {code!r}")
    path = CHAPTERS / (name if name.endswith(".ipynb") else name + ".ipynb")
    nb = json.loads(path.read_text())
    module = types.ModuleType(f"chapter_{path.stem}")
    module.__file__ = str(path)
    wanted = {"export"} if code is None else {"export", "build"}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and wanted & set(c.get("metadata", {}).get("tags", []))]
    if not cells:
        raise ValueError(f"{path.name} has no code cells tagged 'export'")
    if code == "solutions":
        from nanovllm.lab import solution_blocks

        blocks = solution_blocks(path.stem[:2])
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        if code == "solutions" and "build" in cell["metadata"]["tags"]:
            source = blocks[str(cell["metadata"]["exercise"])]
        filename = f"{path.name}:export[{i}]"
        # registered like a file, so that inspect finds the source: Triton's JIT compiles a kernel from it
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), module.__dict__)
    return module
