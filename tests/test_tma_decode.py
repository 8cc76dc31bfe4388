"""The experimental TMA decode kernel (tests/gpu/tma_decode.py): in Triton's interpreter, over an FP8 cache of
128-token blocks, it computes what the reference computes; compiled for sm_90 (no GPU needed), its tiles come by
TMA.  Its GPU results and timings come from the script."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the @triton.jit functions are created

pytest.importorskip("triton.tools.tensor_descriptor")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's check; on a GPU, the script")

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

from decode_sweep import scattered_fp8_cache  # noqa: E402

from nanovllm.attention.torch_ref import paged_decode_ref  # noqa: E402


def tma_module():
    module = importlib.import_module("tma_decode")
    if type(module._tma_decode_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)  # imported earlier without the interpreter: define the kernel again
    return module


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (3, 1, 32)])
def test_tma_decode_equals_the_reference(heads, kv_heads, head_dim):
    tma_decode = tma_module()
    g = torch.Generator().manual_seed(heads)
    lens = torch.tensor([1, 127, 128, 129, 300, 0], dtype=torch.int32)  # the last: a graph's padding row
    k, v, tables = scattered_fp8_cache(lens.tolist(), 128, kv_heads, head_dim, g)
    # stale bytes past a context in its last block may be anything, NaN too (e4m3fn 0x7F): the kernel reads the
    # whole block by TMA and must keep them out of the output; the reference gets the same cache without them
    v_stale = v.clone()
    v_stale.view(torch.uint8)[tables[1, 0], 127] = 0x7F  # 127 tokens: the block's last row is past the context
    v_stale.view(torch.uint8)[tables[4, 2], 44:] = 0x7F  # 300 tokens: rows 44.. of the third block
    k_stale = k.clone()
    k_stale.view(torch.uint8)[tables[4, 2], 44:] = 0x7F
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    ks, vs = torch.rand(kv_heads, generator=g) + 0.5, torch.rand(kv_heads, generator=g) + 0.5
    out = tma_decode.tma_decode(q, k_stale, v_stale, tables, lens, head_dim ** -0.5, ks, vs)
    assert not out.isnan().any()
    ref = paged_decode_ref(q[:-1], k, v, lens[:-1], tables[:-1], head_dim ** -0.5, ks, vs)
    torch.testing.assert_close(out[:-1], ref, atol=2e-2, rtol=2e-2)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_in_the_package_swaps_the_decode_where_one_split_reads_128_token_blocks(monkeypatch):
    """What the script's seed benchmark and traces run: inside the block the package's decode attention is the TMA
    kernel for an FP8 cache of 128-token blocks at one split, the package's own launch elsewhere; after it, the
    package's again."""
    from conftest import interpreted_triton_kernels

    tk = interpreted_triton_kernels()
    module = tma_module()
    package = tk.paged_decode_attention
    tma_calls = []
    real = module.tma_decode
    monkeypatch.setattr(module, "tma_decode", lambda *a, **kw: tma_calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(5)
    lens = torch.tensor([5, 130, 60], dtype=torch.int32)
    k, v, tables = scattered_fp8_cache(lens.tolist(), 128, 2, 64, g)
    q = torch.randn(3, 4, 64, generator=g)
    ks, vs = torch.rand(2, generator=g) + 0.5, torch.rand(2, generator=g) + 0.5
    args = (q, k, v, tables, lens, 0.125)
    with module.in_the_package(2, 4):
        out = tk.paged_decode_attention(*args, num_splits=1, k_scale=ks, v_scale=vs)
        assert tma_calls == [1]
        tk.paged_decode_attention(*args, num_splits=2, k_scale=ks, v_scale=vs)  # several splits: the package's
        assert tma_calls == [1]
    assert tk.paged_decode_attention is package
    torch.testing.assert_close(out, package(*args, num_splits=1, k_scale=ks, v_scale=vs), atol=2e-2, rtol=2e-2)


def test_tma_decode_needs_blocks_of_128():
    tma_decode = tma_module()
    cache = torch.zeros(4, 16, 2, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="blocks of 128"):
        tma_decode.tma_decode(torch.zeros(1, 4, 64), cache, cache, torch.zeros(1, 1, dtype=torch.int32),
                              torch.ones(1, dtype=torch.int32), 0.1, torch.ones(2), torch.ones(2))


COMPILE = """
import json, sys
sys.path[:0] = [{tests!r}, {gpu!r}, {root!r}]
import torch
from triton_compile_check import install_compile_only
compiled = install_compile_only(90)
import tma_decode
q = torch.zeros(4, 16, 128, dtype=torch.bfloat16)
cache = torch.zeros(64, 128, 8, 128, dtype=torch.float8_e4m3fn)
tables, lens, scales = torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, dtype=torch.int32), torch.ones(8)
tma_decode.tma_decode(q, cache, cache, tables, lens, 0.1, scales, scales, num_stages=2)
print(json.dumps([k for n, k in compiled if n == "_tma_decode_kernel"][-1].asm["ptx"]))
"""


@pytest.mark.slow
def test_tma_decode_compiles_for_h100_to_tma_copies(tmp_path):
    """Compiled for sm_90 (no GPU needed), the kernel's K and V tiles come by TMA (cp.async.bulk.tensor, behind
    mbarrier waits), not by per-thread copies, and e4m3 is widened by the GPU's own instruction."""
    import json
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "TRITON_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    code = COMPILE.format(tests=str(root / "tests"), gpu=str(root / "tests" / "gpu"), root=str(root))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout.strip().splitlines()[-1])
    assert re.search(r"\bcp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx), "no TMA copy"
    assert re.search(r"\bmbarrier\.try_wait", ptx)
    assert not re.search(r"\bcp\.async\.(ca|cg)\.shared\.global\s*\[[^]]+\], \[[^]]+\], (?:16|0x10)\b", ptx), \
        "the tiles copied a thread at a time"
    assert re.search(r"\bcvt\.rn\.f16x2\.e4m3x2\b", ptx)
