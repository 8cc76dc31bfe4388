"""What the decode-attention kernel compiles to, without a GPU: its launches compiled for a GPU architecture (as
``triton_compile_check.py`` does, never run), and for each the count of the PTX instructions that move and
convert the K/V tiles (global and shared-memory loads and stores, ``cp.async``, ``ldmatrix``, conversions,
``mma``), per launch as written in the kernel's text (the loop body once, not per iteration).  A tool for kernel
work on the FP8 cache; not collected by pytest.

    python tests/ptx_ops.py [--arch 90] [--batch 1024]

Where a launch reads its tiles from shared memory a byte at a time (``ld.shared.b8``) rather than with
``ldmatrix``, the tile's bytes cost an instruction each: so the FP8 cache's V tile read as bytes, not as 16-bit
words (``fp8_words``; ``figures/data/kernel_measurements.md``).

``--sass`` also disassembles each launch's cubin and counts the instructions of its main loop (the K/V tile loop):
what the GPU issues per tile, after ptxas (register copies included, which PTX does not show).

The counts are those of the Triton installed here, and Triton versions lay tiles out differently: to see what the GPU
machine's Triton makes of a kernel, install that version beside the project's and put it first on the path
(``pip install --target DIR triton==X.Y.Z``, then ``PYTHONPATH=DIR python tests/ptx_ops.py``).  The first line
printed names the version.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # triton_compile_check, beside this file
sys.path.insert(0, str(HERE.parent))  # the repository root

KINDS = ("ld", "st", "cp", "ldmatrix", "cvt", "mma", "wgmma", "prmt", "and", "or", "shl", "shr", "lop3")
OPCODE = re.compile(r"\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)")


def count_ops(ptx: str) -> collections.Counter:
    """PTX opcodes of the kinds above, by their first three dotted parts (``ld.shared.b8``, ``cvt.rn.f16x2``)."""
    ops = collections.Counter()
    # inline PTX comes as one line "{ .reg ...; op ...; op ...; }": each of its instructions on a line of its own
    lines = [part for line in ptx.splitlines()
             for part in (line.strip(" \t{}").split(";") if line.lstrip().startswith("{ ") else [line])]
    for line in lines:
        m = OPCODE.match(line)
        if m is None or line.lstrip().startswith(("//", ".", "$")):
            continue
        op = m.group(1)
        if op.split(".")[0] in KINDS and not op.startswith("ld.param"):
            ops[".".join(op.split(".")[:3])] += 1
    return ops


def launches(batch: int):
    """(label, thunk): the decode kernel as the engine launches it over a bfloat16 and an FP8 cache (Qwen3-0.6B's
    heads), and the FP8 variants ``decode_sweep.py`` times."""
    import torch

    from nanovllm.attention import triton_kernels as tk

    heads, kv_heads, dim, bs = 16, 8, 128, 16
    q = torch.zeros(batch, heads, dim, dtype=torch.bfloat16)
    tables = torch.zeros(batch, 8, dtype=torch.int32)
    lens = torch.full((batch,), 8 * bs, dtype=torch.int32)
    bf16 = [torch.zeros(64, bs, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2)]
    fp8 = [torch.zeros(64, bs, kv_heads, dim, dtype=torch.float8_e4m3fn) for _ in range(2)]
    scales = dict(k_scale=torch.ones(kv_heads), v_scale=torch.ones(kv_heads))
    yield "bfloat16 cache", lambda: tk.paged_decode_attention(q, *bf16, tables, lens, 0.1)
    yield "FP8 cache, bfloat16 products", lambda: tk.paged_decode_attention(q, *fp8, tables, lens, 0.1, **scales)
    yield "FP8 cache, float16 products, read as bytes", lambda: tk.paged_decode_attention(
        q, *fp8, tables, lens, 0.1, **scales, f16_dot=True)
    for words, k_words in (("convert", False), ("asm", False), ("asm", True)):
        yield (f"FP8 cache, float16 products, {'K and ' if k_words else ''}V read as words ({words})"
               + (" (the backend's)" if k_words else ""),
               lambda words=words, k_words=k_words: tk.paged_decode_attention(
                   q, *fp8, tables, lens, 0.1, **scales, f16_dot=True, fp8_words=words, fp8_words_k=k_words))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90, Hopper)")
    ap.add_argument("--batch", type=int, default=1024, help="decode batch (default 1024: one split, big tiles)")
    ap.add_argument("--shared", action="store_true",
                    help="also each launch's shared-memory buffers (TTGIR local_alloc: what goes through it)")
    ap.add_argument("--sass", action="store_true",
                    help="also the SASS of the kernel's longest loop (nvdisasm, shipped with Triton): its instruction "
                         "count and opcodes, the instructions the GPU really issues per tile")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    import triton_compile_check as tcc

    print(f"triton {triton.__version__}, sm_{args.arch}")
    compiled = tcc.install_compile_only(args.arch)
    for label, launch in launches(args.batch):
        compiled.clear()
        launch()
        name, kernel = compiled[0]
        ops = count_ops(kernel.asm["ptx"])
        print(f"{label}: {name}, {kernel.metadata.num_warps} warps, {kernel.metadata.num_stages} stages, "
              f"{kernel.metadata.shared} B shared")
        print("   " + ", ".join(f"{op} {n}" for op, n in ops.most_common(12)))
        if args.shared:
            for line in shared_buffers(kernel.asm["ttgir"]):
                print("   shared: " + line)
        if args.sass:
            n, sass_ops = loop_sass(kernel.asm["cubin"])
            print(f"   SASS, the main loop: {n} instructions; " + ", ".join(f"{op} {k}" for op, k in sass_ops[:12]))


def loop_sass(cubin: bytes) -> tuple[int, list[tuple[str, int]]]:
    """The SASS of a compiled kernel's longest loop (from a label to the backward branch that returns to it):
    its instruction count and its opcodes, most frequent first.  ``nvdisasm`` is the one Triton ships."""
    import subprocess
    import tempfile

    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        lines = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    lines = lines.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [re.match(r"^\.(L_x_\d+):", line.strip())] if m}
    loop = (0, -1)
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > loop[1] - loop[0]:
            loop = (labels[m.group(1)], i)
    ops = collections.Counter()
    for line in lines[loop[0]:loop[1] + 1]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return sum(ops.values()), ops.most_common()


def shared_buffers(ttgir: str) -> list[str]:
    """The kernel's shared-memory buffers, from its TTGIR: ``<shape x type> <layout>`` of each ``local_alloc``, and
    whether a register tile is stored into it (a layout conversion through shared memory) or ``cp.async`` fills it."""
    layouts = dict(re.findall(r"^(#shared\d*) = (#ttg\.\w+<\{[^}]*\}>)", ttgir, re.M))
    out = []
    for m in re.finditer(r"ttg\.local_alloc( %\S+)? : (\([^)]*\) -> )?!ttg\.memdesc<([^,]+), (#shared\d*)", ttgir):
        how = "a register tile stored into it" if m.group(1) else "filled by cp.async"
        out.append(f"{m.group(3)} ({how}), {layouts.get(m.group(4), m.group(4))}")
    return out


if __name__ == "__main__":
    main()
