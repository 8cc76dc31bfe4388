"""Bring a layer's weights into the GPU's L2 cache while its decode attention runs.

A decode step at the seed benchmark's batches (a few hundred rows) reads every weight matrix once per layer, and
its GEMMs are too short to reach DRAM's full rate (a 12.6 MB gate-up product at 256 rows takes ~11 us on an
H100, ~1.1 TB/s).  Decode attention over an FP8 cache runs longer (~140 us a layer at batch 218) and reads
DRAM at ~2.3 of its ~3 TB/s.  So just before attention, one small kernel asks L2 for the weights the layer
reads after it (o, gate-up, down, and the next layer's qkv: 31.5 MB for Qwen3-0.6B, of the H100's 50 MB of L2)
and returns at once; the bytes arrive while attention runs, and the GEMMs then read them from L2.

The asking is one PTX instruction per chunk: ``cp.async.bulk.prefetch.L2`` (sm_90: 16 KB per instruction) or
``prefetch.global.L2`` (a 128-byte line; sm_80 and later).  Neither writes anything, so the kernel changes no
result, only where the bytes come from; with no GPU (Triton's interpreter runs no PTX) it is not used.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # only the GPU path imports this module
    raise ImportError("nanovllm.layers.l2_prefetch needs the `triton` package (pip install triton)") from exc

#: ranges one launch takes (a layer's o, gate-up, down and the next qkv)
MAX_RANGES = 4
#: the settings by name (``nanovllm.kernels.L2_PREFETCH`` takes one's keyword arguments; the GPU scripts the names)
SETTINGS = {"bulk": dict(bulk=True), "bulk-last": dict(bulk=True, evict_last=True), "lines": dict(bulk=False),
            "lines-last": dict(bulk=False, evict_last=True)}
THREADS = 128


@triton.jit
def _l2_prefetch_kernel(p0, p1, p2, p3, n0, n1, n2, n3, c1, c2, c3,
                        THREADS: tl.constexpr, CHUNK: tl.constexpr, BULK: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Chunk ``c`` of the ranges laid end to end (``c1``..``c3``: chunks before ranges 1..3) is one thread's:
    one bulk prefetch of ``CHUNK`` bytes, or ``CHUNK / 128`` line prefetches."""
    c = (tl.program_id(0) * THREADS + tl.arange(0, THREADS)).to(tl.int64)
    r1, r2, r3 = c >= c1, c >= c2, c >= c3
    base = tl.where(r3, p3, tl.where(r2, p2, tl.where(r1, p1, p0)))
    nbytes = tl.where(r3, n3, tl.where(r2, n2, tl.where(r1, n1, n0)))
    first = tl.where(r3, c3, tl.where(r2, c2, tl.where(r1, c1, 0)))
    start = (c - first) * CHUNK
    addr = base + start
    if BULK:
        size = (tl.minimum(nbytes - start, CHUNK) // 16 * 16).to(tl.int32)  # whole 16-byte units, as PTX asks
        ok = (size > 0).to(tl.int32)
        if EVICT_LAST:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b64 pol; setp.ne.b32 p, $3, 0; "
                "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
                "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
                "=r,l,r,r", [addr, size, ok], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                "mov.u32 $0, 0; }",
                "=r,l,r,r", [addr, size, ok], dtype=tl.int32, is_pure=False, pack=1)
    else:
        for i in tl.static_range(0, CHUNK, 128):
            ok = (start + i < nbytes).to(tl.int32)
            if EVICT_LAST:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; "
                    "mov.u32 $0, 0; }",
                    "=r,l,r", [addr + i, ok], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                    "=r,l,r", [addr + i, ok], dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch(tensors, bulk: bool = True, evict_last: bool = False) -> None:
    """Ask L2 for the bytes of up to ``MAX_RANGES`` contiguous CUDA tensors, in one launch that returns at
    once (the bytes arrive while later kernels run).  ``bulk``: 16 KB per instruction (sm_90); else 128-byte
    lines (sm_80 and later).  ``evict_last``: with L2's evict-last hint."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors:
        return
    if len(tensors) > MAX_RANGES:
        raise ValueError(f"l2_prefetch takes at most {MAX_RANGES} tensors, got {len(tensors)}")
    if any(not t.is_cuda or not t.is_contiguous() for t in tensors):
        raise ValueError("l2_prefetch takes contiguous CUDA tensors")
    chunk = 16384 if bulk else 2048
    sizes = [t.numel() * t.element_size() for t in tensors]
    chunks = [-(-n // chunk) for n in sizes]
    starts = [sum(chunks[:i]) for i in range(1, MAX_RANGES)]  # chunks before ranges 1..3
    ptrs = [t.data_ptr() for t in tensors]
    while len(ptrs) < MAX_RANGES:  # absent ranges: empty, past every chunk
        ptrs.append(ptrs[0])
        sizes.append(0)
    total = sum(chunks)
    starts = [min(s, total) for s in starts]
    grid = (-(-total // THREADS),)
    with torch.cuda.device(tensors[0].device):
        _l2_prefetch_kernel[grid](*ptrs, *sizes, *starts, THREADS=THREADS, CHUNK=chunk, BULK=bulk,
                                  EVICT_LAST=evict_last, num_warps=THREADS // 32)
