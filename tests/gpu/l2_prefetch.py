"""An experiment: do the decode GEMMs get faster when their weights are already in L2, and can a layer's weights
be brought into L2 while its attention runs?

Why: over the FP8 cache, decode attention reads at about 2.2-2.4 TB/s of the ~3 TB/s the H100 gives
(``figures/data/fp8_words_h100.txt``), so some DRAM bandwidth is idle while it runs. A layer's weights are
31.5 MB in bfloat16 (o, gate-up, down, and the next layer's qkv projection), and its GEMMs at the seed
benchmark's batches read them from DRAM at about 1 TB/s (``kernel_measurements.md``: the fused gate-up at 256 rows,
11.1 us for 12.6 MB). If attention's spare bandwidth brought them into L2 (50 MB on an H100), the GEMMs after it
would read L2.

What it times, per step of the seed benchmark (28 layers replayed from a CUDA graph, microseconds a layer):

* ``attention``: the backend's FP8 decode launch alone; ``gemms``: o, gate-up + SiLU (the fused kernel), down and
  the next qkv, each layer its own weights (cold, as in decode); ``gemms, warm``: every layer layer 0's weights
  (in L2 after the first);
* ``layer``: attention then the GEMMs; ``layer + prefetch NAME`` (``SETTINGS``): ``l2_prefetch`` (below) first
  asks L2 for the layer's weights (``cp.async.bulk.prefetch.L2`` of 16 KB a thread, or ``prefetch.global.L2`` of
  a line), with the evict-last hint or without, then attention and the GEMMs as before;
* the same with an L2 set-aside for persisting (evict-last) lines, ``cuCtxSetLimit``.

Timed on an H100 (``figures/data/fp8_words_h100.txt`` section 16): the GEMMs take as long with their weights in
L2 as without (33.2 against 33.3 us a layer at batch 218), and the prefetch slows the layer by 4-11 us. The
package had the prefetch as an option for one session; it was taken out again, and the kernel lives here.

    PYTHONPATH=. python3 tests/gpu/l2_prefetch.py [--steps 200,600,900]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from decode_sweep import BS, HKV, D, batch_at_step, graph_inputs  # noqa: E402
from gemm_check import LAYERS, graph_us  # noqa: E402

from nanovllm.attention import triton_kernels as tk  # noqa: E402
from nanovllm.bench import seed_workload  # noqa: E402
from nanovllm.layers.triton_gemm import skinny_gemm  # noqa: E402

#: ranges one launch takes (a layer's o, gate-up, down and the next qkv)
MAX_RANGES = 4
#: the settings by name
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


HIDDEN, INTER, QKV = 1024, 3072, 4096
# a layer's weights in one buffer, in the order decode reads them after attention
PARTS = {"o": (HIDDEN, 2048), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER), "qkv": (QKV, HIDDEN)}
def set_persisting_l2(nbytes: int) -> int:
    """The L2 set-aside for persisting (evict-last) lines, through the driver; returns what it now is."""
    cuda = ctypes.CDLL("libcuda.so.1")
    limit = 0x06  # CU_LIMIT_PERSISTING_L2_CACHE_SIZE
    rc = cuda.cuCtxSetLimit(ctypes.c_int(limit), ctypes.c_size_t(nbytes))
    got = ctypes.c_size_t(0)
    cuda.cuCtxGetLimit(ctypes.byref(got), ctypes.c_int(limit))
    if rc:
        print(f"  cuCtxSetLimit({nbytes}) returned {rc}")
    return got.value


def max_persisting_l2() -> int:
    cuda = ctypes.CDLL("libcuda.so.1")
    value = ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(value), ctypes.c_int(108), ctypes.c_int(torch.cuda.current_device()))
    return value.value  # CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE


def layer_weights(seed: int = 0):
    """``LAYERS`` buffers of a layer's weights (``PARTS`` in order) and each one's views."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    numel = sum(n * k for n, k in PARTS.values())
    bufs, views = [], []
    for _ in range(LAYERS):
        buf = torch.randn(numel, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
        at, v = 0, {}
        for name, (n, k) in PARTS.items():
            v[name] = buf[at:at + n * k].view(n, k)
            at += n * k
        bufs.append(buf)
        views.append(v)
    return bufs, views


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="200,600,900")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    props = torch.cuda.get_device_properties(0)
    print(f"L2 {props.L2_cache_size / 2**20:.0f} MiB; a layer's weights "
          f"{sum(n * k for n, k in PARTS.values()) * 2 / 1e6:.1f} MB")
    w = seed_workload()
    bufs, views = layer_weights()
    for step in [int(s) for s in args.steps.split(",")]:
        time_step(w, step, bufs, views)
        torch.cuda.empty_cache()


def time_step(w, step: int, bufs, views) -> None:
    ctx = batch_at_step(w, step)
    nb, tables, lens, q = graph_inputs(ctx)
    k = torch.randn(nb * LAYERS + 8, BS, HKV, D, device="cuda").to(torch.float8_e4m3fn)
    v = torch.randn(nb * LAYERS + 8, BS, HKV, D, device="cuda").to(torch.float8_e4m3fn)
    ones = torch.ones(HKV, device="cuda")
    att_out = torch.empty_like(q)
    eng = dict(f16_dot=True, fp8_words=tk.TritonBackend.fp8_words, fp8_words_k=tk.TritonBackend.fp8_words_k)

    def attention(layer):
        tk.paged_decode_attention(q, k, v, tables[layer], lens, D ** -0.5, out=att_out, k_scale=ones,
                                  v_scale=ones, **eng)

    def gemms(wts):
        h = F.linear(att_out.flatten(1), wts["o"])
        d = F.linear(skinny_gemm(h, wts["gate_up"], act="silu_mul"), wts["down"])
        F.linear(d, wts["qkv"])

    def run(att=True, gem=True, warm=False, prefetch=None):
        def fn():
            for layer in range(LAYERS):
                if prefetch:
                    l2_prefetch([bufs[layer]], **SETTINGS[prefetch])
                if att:
                    attention(layer)
                if gem:
                    gemms(views[0] if warm else views[layer])
        return graph_us(fn)

    res = {"attention": run(gem=False), "gemms": run(att=False), "gemms, warm": run(att=False, warm=True),
           "layer": run()}
    for name in SETTINGS:
        res[f"layer + prefetch {name}"] = run(prefetch=name)
    res["prefetch bulk alone"] = run(att=False, gem=False, prefetch="bulk")
    got = set_persisting_l2(max_persisting_l2())
    res[f"set-aside {got / 2**20:.1f} MiB: layer"] = run()
    for name in ("bulk-last", "lines-last"):
        res[f"set-aside: layer + prefetch {name}"] = run(prefetch=name)
    res["set-aside: gemms, warm"] = run(att=False, warm=True)
    set_persisting_l2(0)
    res["layer, timed again last"] = run()
    print(f"step {step} batch {len(ctx)} (bucket {len(lens)}): us a layer")
    for name, us in res.items():
        print(f"  {us:7.1f}  {name}", flush=True)


if __name__ == "__main__":
    main()
