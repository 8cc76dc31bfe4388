"""The flat FP8 decode (``flat_decode_attention``, off in the backend: ``TritonBackend.fp8_flat``): in Triton's
interpreter it computes what the reference computes for any number of programs sharing the batch's tiles (an item's
tiles split over programs and combined, rows of no context anywhere in the batch, stale NaN bytes past a context);
the backend takes it where switched on; compiled for sm_90 (no GPU needed), its loop's loads are pipelined.  Its GPU
results and timings come from tests/gpu/flat_decode.py."""

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


def flat_module():
    """The package's kernels interpreted, and the GPU script (which calls them through the package)."""
    from conftest import interpreted_triton_kernels

    tk = interpreted_triton_kernels()
    return tk, importlib.import_module("flat_decode")


@pytest.mark.parametrize("tma,block_size,q_carried,bt_ahead", [
    (False, 16, False, False), (True, 128, False, False), (False, 16, True, True), (True, 128, True, True),
    (False, 16, False, True)])
@pytest.mark.parametrize("programs", [1, 4, 9, 64])
def test_flat_decode_equals_the_reference(tma, block_size, q_carried, bt_ahead, programs):
    tk, _ = flat_module()
    g = torch.Generator().manual_seed(programs)
    # rows of no context (a graph's padding, and one between others), lengths at the tiles' edges; with 4 or 9
    # programs items split at every kind of place, with 64 most programs have a tile or none
    lens = torch.tensor([1, 127, 0, 128, 129, 300, 5, 0], dtype=torch.int32)
    k, v, tables = scattered_fp8_cache(lens.tolist(), block_size, 2, 32, g)
    k_stale, v_stale = k.clone(), v.clone()  # NaN (e4m3fn 0x7F) past the contexts in their last blocks
    for i, n in enumerate(lens.tolist()):
        if n % block_size:
            for c in (k_stale, v_stale):
                c.view(torch.uint8)[tables[i, (n - 1) // block_size], n % block_size:] = 0x7F
    q = torch.randn(len(lens), 4, 32, generator=g)
    ks, vs = torch.rand(2, generator=g) + 0.5, torch.rand(2, generator=g) + 0.5
    out = torch.full_like(q, float("nan"))  # every row written, the empty ones with zeros
    tk.flat_decode_attention(q, k_stale, v_stale, tables, lens, 32 ** -0.5, ks, vs, out=out, tma=tma,
                             programs=programs, q_carried=q_carried, bt_ahead=bt_ahead)
    live = lens > 0
    ref = paged_decode_ref(q[live], k, v, lens[live], tables[live], 32 ** -0.5, ks, vs)
    torch.testing.assert_close(out[live], ref, atol=2e-2, rtol=2e-2)
    assert torch.equal(out[~live], torch.zeros_like(out[~live]))


def test_flat_decode_splits_an_item_as_the_split_kernel_does():
    """One long sequence over many programs: the parts' log-sum-exp weighting gives the one-program result."""
    tk, _ = flat_module()
    g = torch.Generator().manual_seed(3)
    lens = torch.tensor([1000], dtype=torch.int32)
    k, v, tables = scattered_fp8_cache(lens.tolist(), 16, 1, 16, g)
    q = torch.randn(1, 3, 16, generator=g)
    ones = torch.ones(1)
    one = tk.flat_decode_attention(q, k, v, tables, lens, 0.25, ones, ones, programs=1)
    many = tk.flat_decode_attention(q, k, v, tables, lens, 0.25, ones, ones, programs=5)  # 8 tiles: parts of 2
    # each part rounds its softmax weights to float16 under its own maximum: close, not equal
    torch.testing.assert_close(many, one, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(one, paged_decode_ref(q, k, v, lens, tables, 0.25, ones, ones), atol=2e-2, rtol=2e-2)


def test_the_scripts_swap_gives_the_package_its_decode_back():
    tk, flat = flat_module()
    package = tk.paged_decode_attention
    g = torch.Generator().manual_seed(5)
    lens = torch.tensor([5, 130, 60], dtype=torch.int32)
    k, v, tables = scattered_fp8_cache(lens.tolist(), 16, 2, 32, g)
    q = torch.randn(3, 4, 32, generator=g)
    ks, vs = torch.rand(2, generator=g) + 0.5, torch.rand(2, generator=g) + 0.5
    calls = []
    real = flat.flat_decode
    flat.flat_decode = lambda *a, **kw: calls.append(kw["tma"]) or real(*a, **kw)
    try:
        with flat.in_the_package(tma=True):  # blocks of 16: TMA cannot read them, the package's kernel does
            tk.paged_decode_attention(q, k, v, tables, lens, 0.2, k_scale=ks, v_scale=vs)
            assert calls == []
        with flat.in_the_package(tma=False):
            out = tk.paged_decode_attention(q, k, v, tables, lens, 0.2, k_scale=ks, v_scale=vs)
            assert calls == [False]
    finally:
        flat.flat_decode = real
    assert tk.paged_decode_attention is package
    torch.testing.assert_close(out, package(q, k, v, tables, lens, 0.2, k_scale=ks, v_scale=vs), atol=2e-2,
                               rtol=2e-2)


def test_flat_decode_refuses_what_it_cannot_read():
    tk, _ = flat_module()
    cache = torch.zeros(4, 16, 2, 32, dtype=torch.float8_e4m3fn)
    args = (torch.zeros(1, 4, 32), cache, cache, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
            0.1, torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="blocks of 128"):
        tk.flat_decode_attention(*args, tma=True, programs=2)
    with pytest.raises(ValueError, match="e4m3"):
        tk.flat_decode_attention(args[0], cache.float(), cache.float(), *args[3:], programs=2)
    with pytest.raises(ValueError, match="out must be shaped as q"):
        tk.flat_decode_attention(*args, out=torch.zeros(1, 32, 4).transpose(1, 2), programs=2)
    assert not tk.flat_decode_reads(args[0], cache.float(), cache.float(), args[3])
    assert tk.flat_decode_reads(args[0], cache, cache, args[3])


def test_the_backend_takes_the_flat_decode_where_switched_on(monkeypatch):
    """``TritonBackend.fp8_flat``: decode over an FP8 cache with bfloat16 queries goes through the flat kernel (and
    gives the split kernel's output); off, the split kernel; prefill never."""
    from nanovllm.attention.base import AttentionMetadata

    tk, _ = flat_module()
    g = torch.Generator().manual_seed(7)
    lens = torch.tensor([40, 200, 3], dtype=torch.int32)
    k, v, tables = scattered_fp8_cache(lens.tolist(), 16, 2, 32, g)
    q = torch.randn(3, 4, 32, generator=g).to(torch.bfloat16)
    ks, vs = torch.rand(2, generator=g) + 0.5, torch.rand(2, generator=g) + 0.5
    meta = AttentionMetadata(is_prefill=False, cu_seqlens_q=torch.arange(4, dtype=torch.int32), context_lens=lens,
                             slot_mapping=torch.zeros(3, dtype=torch.int64), block_tables=tables, max_seqlen_q=1,
                             max_seqlen_k=200)
    calls = []
    real = tk.flat_decode_attention
    monkeypatch.setattr(tk, "flat_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, programs=5))
    backend = tk.TritonBackend()
    split = backend.forward(q, None, None, k, v, meta, 32 ** -0.5, ks, vs)
    assert calls == []
    monkeypatch.setattr(tk.TritonBackend, "fp8_flat", True)
    flat = backend.forward(q, None, None, k, v, meta, 32 ** -0.5, ks, vs)
    assert calls == [1]
    torch.testing.assert_close(flat.float(), split.float(), atol=2e-2, rtol=2e-2)


COMPILE = """
import json, sys
sys.path[:0] = [{tests!r}, {gpu!r}, {root!r}]
import torch
from triton_compile_check import install_compile_only
compiled = install_compile_only(90)
from nanovllm.attention.triton_kernels import flat_decode_attention
q = torch.zeros(4, 16, 128, dtype=torch.bfloat16)
tables, lens, scales = torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, dtype=torch.int32), torch.ones(8)
ptx = []
for tma, bs in ((False, 16), (True, 128)):
    cache = torch.zeros(64, bs, 8, 128, dtype=torch.float8_e4m3fn)
    flat_decode_attention(q, cache, cache, tables, lens, 0.1, scales, scales, tma=tma, programs=396)
    ptx.append([k for n, k in compiled if n == "_flat_decode_kernel"][-1].asm["ptx"])
print(json.dumps(ptx))
"""


@pytest.mark.slow
def test_flat_decode_compiles_for_h100_with_its_loads_pipelined(tmp_path):
    """Compiled for sm_90: the words launch copies its tiles 16 bytes a thread by cp.async (Triton's software
    pipeline; without it the loads go straight to registers), the TMA launch by cp.async.bulk.tensor behind
    mbarrier waits; both widen e4m3 by the GPU's own instruction."""
    import json
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {"PATH": "/usr/bin:/bin", "TRITON_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    code = COMPILE.format(tests=str(root / "tests"), gpu=str(root / "tests" / "gpu"), root=str(root))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    words, tma = json.loads(proc.stdout.strip().splitlines()[-1])
    assert re.search(r"\bcp\.async\.cg\.shared\.global\s*\[[^]]+\], \[[^]]+\], (?:16|0x10)\b", words)
    assert re.search(r"\bcp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", tma)
    assert re.search(r"\bmbarrier\.try_wait", tma)
    assert all(re.search(r"\bcvt\.rn\.f16x2\.e4m3x2\b", p) for p in (words, tma))


def test_as_many_programs_as_an_sm_holds(monkeypatch):
    """The default grid: the programs an SM holds by shared memory (Triton 3.6's sm_90 sizes of the kernel: 73,732 B
    at 2 stages, 110,600 at 3 with the block table ahead), at most 3 (registers)."""
    tk, _ = flat_module()
    cpu = torch.device("cpu")
    for shared, default, ahead in ((232448, 3, 2), (166912, 2, 1), (101376, 1, 1)):  # H100, A100, RTX 4060 Laptop
        monkeypatch.setattr(tk, "max_shared_memory", lambda device, s=shared: s)
        assert tk.flat_programs_per_sm(128, 16, 2, False, False, cpu) == default
        assert tk.flat_programs_per_sm(128, 16, 3, False, True, cpu) == ahead
    assert tk.flat_programs_per_sm(64, 16, 2, False, False, cpu) == 2  # 36 KB each: 2 on the laptop card
