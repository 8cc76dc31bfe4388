"""Programmatic dependent launch (nanovllm/triton_pdl.py): taken only where the GPU and Triton have it, and
every kernel of the package that may be launched with it waits for the kernel before it first.

The GPU run checks that the tokens do not change (tests/gpu/fp8_check.py --pdl); the compile check
(tests/test_triton_compile.py) that every kernel compiled for sm_90 has the wait and none for sm_86/89."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from nanovllm import triton_pdl  # noqa: E402

MODULES = ("nanovllm.attention.triton_kernels", "nanovllm.layers.triton_gemm", "nanovllm.layers.triton_sampler")


def test_pdl_only_on_a_gpu_that_has_it(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not triton_pdl.use_pdl(cpu)
    assert triton_pdl.pdl_options(cpu) == {"PDL": False}  # no launch_pdl: the interpreter never meets it
    monkeypatch.setattr(triton_pdl, "_pdl_capable", lambda device_type, index: device_type == "cuda")
    monkeypatch.setattr(triton_pdl, "PDL", True)
    assert triton_pdl.pdl_options(gpu) == {"PDL": True, "launch_pdl": True}
    assert triton_pdl.pdl_options(cpu) == {"PDL": False}
    monkeypatch.setattr(triton_pdl, "PDL", False)  # the switch, for timing without it
    assert triton_pdl.pdl_options(gpu) == {"PDL": False}


def test_sm_80_to_89_take_no_pdl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for major, expected in ((8, False), (9, triton_pdl.HAS_GDC), (10, triton_pdl.HAS_GDC)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, major=major: (major, 0))
        triton_pdl._pdl_capable.cache_clear()
        assert triton_pdl._pdl_capable("cuda", 0) is expected, major
    triton_pdl._pdl_capable.cache_clear()


def kernels():
    """The kernels the host launches (``@triton.jit`` functions named ``*_kernel``; under the interpreter too)."""
    for module in MODULES:
        for name, value in vars(importlib.import_module(module)).items():
            if name.endswith("_kernel") and inspect.isfunction(getattr(value, "fn", None)):
                yield name, value.fn


def test_every_kernel_waits_first():
    """A kernel launched with PDL may start while the one before it still runs: anything it read or wrote
    before ``pdl_wait`` would race with that kernel.  So the wait is each kernel's first statement."""
    names = []
    for name, fn in kernels():
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        func = tree.body[0]
        assert "PDL" in [a.arg for a in func.args.args + func.args.kwonlyargs], name
        body = [s for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        first = body[0]
        assert (isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
                and ast.unparse(first.value) == "pdl_wait(PDL)"), f"{name} starts with {ast.unparse(first)}"
        names.append(name)
    assert {"_decode_split_kernel", "_skinny_gemm_kernel", "_qkv_rope_store_kernel"} <= set(names)
