"""The package's Triton kernels compile for real GPUs (tests/triton_compile_check.py), checked on a CPU.

The other Triton tests interpret the kernels; these compile them to cubins for an 8 GB laptop card
(sm_86: Ampere, 99 KiB of shared memory; sm_89: Ada, with FP8) and for the H100/H200 (sm_90), each in a
fresh process with the interpreter off, and check every configuration fits that card's shared memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "triton_compile_check.py"


def compile_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [86, 89, 90])
def test_every_kernel_compiles_for(arch, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch)], env=compile_env(tmp_path),
                          capture_output=True, text=True, timeout=1800)
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, "\n".join(failed or lines[-5:]) + proc.stderr[-3000:]
    assert "never compiled: none;" in lines[-1], lines[-1]
    # from sm_90 on every kernel waits for the one before it (programmatic dependent launch); below, none does
    assert lines[-1].endswith(f"{'without' if arch >= 90 else 'with'} the PDL wait: none"), lines[-1]
    if arch >= 89:  # the FP8 cache's kernels were among them
        assert any(line.startswith("ok   store_kvcache") and "float8_e4m3fn" in line for line in lines)


BROKEN = '''
import triton
import triton.language as tl


@triton.jit
def retyped_kernel(x_ptr, out_ptr, FLAG: tl.constexpr):
    x = tl.load(x_ptr)
    if tl.load(x_ptr + 1) > 0:  # a runtime branch
        x = x.to(tl.float8e4nv) if FLAG else x  # x changes type in one branch only: the compiler refuses
    tl.store(out_ptr, x.to(tl.float32))
'''


def test_the_check_catches_what_the_interpreter_lets_through(tmp_path):
    """The kind of bug chapter 12 met on a GPU: the interpreter runs the kernel, the compiler refuses it."""
    (tmp_path / "broken.py").write_text(BROKEN)
    launch = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, {where!r})
        {setup}
        from broken import retyped_kernel
        x, out = torch.tensor([1.0, 1.0]), torch.zeros(1)
        try:
            retyped_kernel[(1,)](x, out, FLAG=True)
        except Exception as e:
            print("refused:", type(e).__name__)
        else:
            print("ran")
    """)
    compile_only = "from triton_compile_check import install_compile_only; install_compile_only(90)"
    results = {}
    for mode, setup, extra_env in [("interpreted", "", {"TRITON_INTERPRET": "1"}),
                                   ("compiled", compile_only, {})]:
        code = launch.format(where=str(tmp_path), setup=setup)
        env = compile_env(tmp_path) | extra_env | {"PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = proc.stdout.strip().splitlines()[-1]
    assert results == {"interpreted": "ran", "compiled": "refused: CompilationError"}


def test_the_script_refuses_the_interpreter(tmp_path):
    env = compile_env(tmp_path) | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET is set" in proc.stderr
