"""Packaging: environment.yml and pyproject.toml list the same dependencies, and the light modules (the
package itself, the block manager, the scheduler, the config) import without the heavy ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def norm(req: str) -> str:
    """A requirement with insignificant whitespace and quoting removed, the name lower-cased."""
    req = req.strip().replace('"', "'")
    name, rest = re.match(r"([A-Za-z0-9_.\-\[\]]+)(.*)", req).groups()
    rest = re.sub(r"\s*;\s*", "; ", re.sub(r"\s*([<>=!~]=?|==)\s*", r"\1", rest)).strip()
    return name.lower().replace("_", "-") + rest


def environment_yml():
    """(conda dependencies, pip dependencies) of environment.yml, parsed by hand (PyYAML may be missing)."""
    conda, pip = [], []
    in_deps = False
    pip_indent = None
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        text = line.strip()
        if indent == 0:
            in_deps = text == "dependencies:"
            pip_indent = None
            continue
        if not in_deps or not text.startswith("- "):
            continue
        item = text[2:].strip()
        if pip_indent is not None and indent > pip_indent:
            pip.append(item)
            continue
        pip_indent = None
        if item == "pip:":
            pip_indent = indent
        else:
            conda.append(item)
    return conda, pip


def test_environment_yml_parses():
    conda, pip = environment_yml()
    assert "pip" in conda and any(c.startswith("python") for c in conda)
    assert len(pip) > 5


def test_environment_yml_matches_pyproject():
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    want = {norm(r) for r in project["dependencies"] + extras["notebooks"] + extras["dev"]}
    _, pip = environment_yml()
    have = {norm(r) for r in pip if not r.startswith("-")}  # "-e ." installs the package itself
    assert have - want == set(), f"in environment.yml only: {sorted(have - want)}"
    assert want - have == set(), f"in pyproject.toml only: {sorted(want - have)}"
    assert "-e ." in pip


def test_environment_yml_python_matches_requires_python():
    conda, _ = environment_yml()
    [python] = [c for c in conda if re.match(r"python\b", c)]
    assert python.replace(" ", "") == "python" + pyproject()["project"]["requires-python"].replace(" ", "")


def test_norm_is_strict_enough():
    assert norm("torch >= 2.5") == norm("torch>=2.5")
    assert norm("torch>=2.5") != norm("torch>=2.6")
    assert norm("triton>=3.0; platform_system == 'Linux'") == norm('triton>=3.0 ; platform_system=="Linux"')


HEAVY = ("triton", "transformers", "flash_attn")


def heavy_modules_after_importing(modules: list[str]) -> list[str]:
    """Import ``modules`` in a fresh interpreter; which of HEAVY did that pull in?"""
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("modules", [
    ["nanovllm"],
    ["nanovllm.engine.block_manager"],
    ["nanovllm.engine.scheduler"],
    ["nanovllm.config"],
    ["nanovllm", "nanovllm.engine.block_manager", "nanovllm.engine.scheduler", "nanovllm.config",
     "nanovllm.sampling_params", "nanovllm.engine.sequence"],
])
def test_light_imports_stay_light(modules):
    assert heavy_modules_after_importing(modules) == []


def test_the_probe_sees_a_heavy_import():
    assert heavy_modules_after_importing(["nanovllm.config", "transformers"]) == ["transformers"]


def test_lint_is_clean():
    """``ruff check .`` (the README's lint command) passes: package, tests, figures, chapters and solutions."""
    ruff = pytest.importorskip("ruff")
    proc = subprocess.run([ruff.find_ruff_bin(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
