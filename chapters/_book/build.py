"""Build the book as a static website from the committed, executed notebooks (nothing is re-run)::

    python chapters/_book/build.py                 # writes build/book/; open build/book/index.html
    python chapters/_book/build.py --out site      # anywhere else

Sphinx with MyST-NB and the Sphinx Book Theme, configured in conf.py beside this file.  The sources are staged
in a temporary folder first (this folder's index.md, the chapters, the figures), so that the site's root is
the book's front page and the repository is left as it was.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def stage(src: Path) -> None:
    """The site's sources: the front page, every chapter (with the files it links to, the exercises'
    solutions among them), the figures."""
    shutil.copy(HERE / "index.md", src / "index.md")
    (src / "chapters").mkdir()
    for path in sorted((ROOT / "chapters").glob("[0-9]*.ipynb")) + sorted((ROOT / "chapters").glob("*.py")):
        shutil.copy(path, src / "chapters" / path.name)
    shutil.copytree(ROOT / "chapters" / "solutions", src / "chapters" / "solutions",
                    ignore=shutil.ignore_patterns("__pycache__"))  # the exercises link to their solutions
    shutil.copytree(ROOT / "figures", src / "figures", ignore=shutil.ignore_patterns("*.py", "data"))


def build(out: Path, *, quiet: bool = True, warning_file: Path | None = None) -> int:
    """Build the site into ``out``; Sphinx's exit status (0: built).  Warnings go to stderr and, when
    given, to ``warning_file`` too."""
    from sphinx.cmd.build import build_main

    with tempfile.TemporaryDirectory(prefix="nanovllm-book-") as tmp:
        src, html = Path(tmp) / "src", Path(tmp) / "html"  # MyST-NB writes beside html/: keep that in tmp
        src.mkdir()
        stage(src)
        args = ["-b", "html", "-c", str(HERE), "-d", str(Path(tmp) / "doctrees"), "-E", "-j", "1"]
        if quiet:
            args.append("-q")
        if warning_file is not None:
            args += ["-w", str(warning_file)]
        status = build_main([*args, str(src), str(html)])
        if status == 0:
            shutil.copytree(html, out, dirs_exist_ok=True)
        return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "book", help="where the HTML goes")
    ap.add_argument("--warnings", type=Path, help="also write Sphinx's warnings to this file")
    args = ap.parse_args()
    t0 = time.monotonic()
    status = build(args.out.resolve(), warning_file=args.warnings)
    if status == 0:
        print(f"built in {time.monotonic() - t0:.0f} s: open {args.out / 'index.html'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
