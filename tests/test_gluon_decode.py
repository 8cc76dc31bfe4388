"""The experimental Gluon decode kernel (tests/gpu/gluon_decode.py) compiles for an H100 and keeps the property it
exists for, checked on a CPU: compiled for sm_90 with the interpreter off, the loop of its register variant reads K
and V 16 bytes a thread from global memory and touches no shared memory and no barrier (Gluon does not run in
Triton's interpreter; its results are checked against the Triton kernel on a GPU by the script itself)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton.experimental.gluon")

ROOT = Path(__file__).resolve().parents[1]

COMPILE = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{tests!r}, {gpu!r}, {root!r}]
    import torch
    from triton_compile_check import install_compile_only
    compiled = install_compile_only(90)
    import gluon_decode
    out = {{}}
    for name, (h, hkv, d) in (("32", (16, 8, 128)), ("16s2", (9, 3, 64))):
        q = torch.zeros(4, h, d, dtype=torch.bfloat16)
        cache = torch.zeros(64, 16, hkv, d, dtype=torch.float8_e4m3fn)
        tables, lens, scales = torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, dtype=torch.int32), torch.ones(hkv)
        gluon_decode.gluon_fp8_decode(q, cache, cache, tables, lens, d ** -0.5, scales, scales,
                                      **gluon_decode.variant(name))
        out[name] = [k for n, k in compiled if n == "_fp8_decode_kernel"][-1].asm["ptx"]
    print(json.dumps(out))
""")


def loop_body(ptx: str) -> str:
    """The PTX between the kernel's one backward branch and the label it jumps to (the chunk loop)."""
    lines = ptx.splitlines()
    labels = {m[1]: i for i, line in enumerate(lines) if (m := re.match(r"(\$L__BB\d+_\d+):", line))}
    loops = [(labels[m[1]], i) for i, line in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)) and labels.get(m[1], i + 1) < i]
    assert loops, "no backward branch: the kernel has no loop"
    first, last = min(loops)[0], max(end for _, end in loops)
    return "\n".join(lines[first:last + 1])


@pytest.mark.slow
def test_gluon_decode_compiles_for_h100_without_shared_memory_in_its_loop(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TRITON_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    code = COMPILE.format(tests=str(ROOT / "tests"), gpu=str(ROOT / "tests" / "gpu"), root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout.strip().splitlines()[-1])

    body = loop_body(ptx["32"])  # registers only, 32 tokens a warp, head_dim 128
    assert not re.search(r"\b(ld|st)\.shared|\bbar\.sync|\bcp\.async", body), "shared memory in the loop"
    # a thread's share of a chunk: 32 tokens x 128 bytes of K and of V over 32 lanes, 16 bytes a load
    assert len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.b32", body)) == 2 * 32 * 128 // 32 // 16
    assert len(re.findall(r"\bmma\.sync\.aligned\.m16n8k16", body)) == 64  # 2 products x 32 per chunk

    body = loop_body(ptx["16s2"])  # two cp.async buffers, head_dim 64
    assert re.search(r"\bcp\.async\.cg\.shared\.global\s*\[[^]]+\], \[[^]]+\], (?:16|0x10)\b", body), \
        "the cp.async variant copies 16 bytes at a time"
