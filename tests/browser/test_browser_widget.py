"""Chapter 03's widget in a real browser (headless Chromium driving JupyterLab): see check_widget.py.

Skipped where Chromium, JupyterLab, ipywidgets or websocket-client is missing.  It runs the whole chapter, so it
takes minutes on a CPU.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "check_widget.py"

missing = [m for m in ("jupyterlab", "ipywidgets", "websocket") if importlib.util.find_spec(m) is None]
if not (shutil.which("chromium") or shutil.which("chromium-browser")):
    missing.append("chromium")


@pytest.mark.slow
@pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")
def test_widget_renders_in_jupyterlab(tmp_path):
    out = tmp_path / "shot.png"
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"widget: slider True, svg with [1-9]\d* blocks", run.stdout), run.stdout
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
