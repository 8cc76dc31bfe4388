"""Programmatic dependent launch (PDL) on a decode layer's chain of kernels (a script, not a pytest module).

    PYTHONPATH=. python3 tests/gpu/pdl_check.py [--rows 8,32,64,128,224] [--out DIR]

A decode step is ~250 small kernels in a row (9 a layer); at small batches its time is mostly their
boundaries: a kernel starts only when the one before it has ended, and ramps its loads up from nothing
(figures/data/fp8_words_h100.txt section 19: ~1.6 ms a step at batch 1-16 against ~0.4 ms to read the
weights).  With PDL (sm_90: launch attribute ``programmaticStreamSerialization``, Triton's ``launch_pdl``) a
kernel's programs may start while the one before it still runs; ``griddepcontrol.wait`` (``gdc_wait``) holds
them until its results are visible.  What a program does before the wait can only touch what the kernel
before it does not write: for a GEMM, its weights, which it can ask L2 for (``prefetch.global.L2``).

The layer here is the engine's chain with stand-ins where the engine's kernels need an engine: add + RMSNorm,
qkv GEMM, an attention stand-in (reads ``--attn-mb`` MB of its own, like attention reads the cache, and passes
q on), o GEMM, add + RMSNorm, gate-up GEMM + SiLU-and-mul, down GEMM; 28 layers of their own weights
(Qwen3-0.6B's shapes), replayed from one CUDA graph, us a layer:

* ``engine``: what the engine launches: cuBLAS for qkv, o and down, Triton for the rest, no PDL;
* ``triton``: every kernel Triton (the skinny GEMM's tiles, ``nanovllm.layers.triton_gemm.TILES``), no PDL;
* ``pdl``: the same, each kernel launched with PDL, waiting at its top;
* ``pdl+l2``: the GEMMs first ask L2 for their weight stripes, then wait;
* ``pdl early``: as ``pdl+l2``, each kernel letting the next one launch at its top (before its own wait);
* ``engine+pdl``: cuBLAS for qkv, o and down, the Triton kernels with PDL (all the engine could do without
  GEMMs of its own).

Each variant's output is checked against ``triton``'s (the same kernels, so equal bit for bit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from gemm_check import LAYERS, graph_us  # noqa: E402  (beside this script)

from nanovllm.layers.triton_gemm import default_config  # noqa: E402

HIDDEN, Q, KV, INTER = 1024, 2048, 1024, 3072


@triton.jit
def _pdl_top(PDL: tl.constexpr, EARLY: tl.constexpr):
    if PDL:
        if EARLY:
            gdc_launch_dependents()
        gdc_wait()
        if not EARLY:
            gdc_launch_dependents()


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr, EARLY: tl.constexpr, L2: tl.constexpr):
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    up_rows = w_rows + N * K
    offs_k = tl.arange(0, BLOCK_K)
    if L2:  # the stripe's weights, 128-byte lines, before waiting for x
        lines = tl.arange(0, BLOCK_K // 64)[None, :] * 64
        for k0 in range(0, K, BLOCK_K):
            p = w_rows + k0 + lines
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                                      is_pure=False, pack=1)
            if ACT == 1:
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [p + N * K],
                                          dtype=tl.int32, is_pure=False, pack=1)
    _pdl_top(PDL, EARLY)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)
        b = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
        acc += tl.dot(a, tl.trans(b))
        if ACT == 1:
            b_up = tl.load(up_rows + k[None, :], mask=n_mask[:, None], other=0.0)
            acc_up += tl.dot(a, tl.trans(b_up))
    if ACT == 1:
        gate = acc.to(tl.bfloat16).to(tl.float32)
        up = acc_up.to(tl.bfloat16).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(tl.bfloat16),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _add_norm_kernel(y_ptr, res_ptr, w_ptr, out_ptr, N, stride_y, eps, BLOCK: tl.constexpr,
                     PDL: tl.constexpr, EARLY: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs)
    _pdl_top(PDL, EARLY)
    h = (tl.load(y_ptr + m * stride_y + offs).to(tl.float32) + tl.load(res_ptr + m * N + offs).to(tl.float32))
    h = h.to(tl.bfloat16)
    tl.store(res_ptr + m * N + offs, h)
    hf = h.to(tl.float32)
    out = (hf * tl.rsqrt(tl.sum(hf * hf, 0) / N + eps)).to(tl.bfloat16).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + m * N + offs, out.to(tl.bfloat16))


@triton.jit
def _attn_stand_in_kernel(q_ptr, o_ptr, buf_ptr, M, stride_q, CHUNK: tl.constexpr, WIDTH: tl.constexpr,
                          PDL: tl.constexpr, EARLY: tl.constexpr):
    # program i reads CHUNK bytes of the buffer (as attention reads the cache); programs < M pass their row of q
    # on, plus 0 * what they read (so the reads stay)
    pid = tl.program_id(0)
    _pdl_top(PDL, EARLY)
    offs = tl.arange(0, 1024)
    acc = tl.zeros([1024], tl.float32)
    base = buf_ptr + pid.to(tl.int64) * (CHUNK // 2)
    for i in range(0, CHUNK // 2, 1024):
        acc += tl.load(base + i + offs).to(tl.float32)
    if pid < M:
        c = tl.arange(0, WIDTH)
        row = tl.load(q_ptr + pid.to(tl.int64) * stride_q + c).to(tl.float32)
        tl.store(o_ptr + pid.to(tl.int64) * WIDTH + c, (row + 0.0 * tl.sum(acc, 0)).to(tl.bfloat16))


def gemm(x, w, y, act, pdl, early, l2):
    m, k = x.shape
    n = w.shape[0] // (2 if act else 1)
    cfg = default_config(m)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _gemm_kernel[grid](x, w, y, m, n, k, x.stride(0), y.stride(0), ACT=int(act), BLOCK_M=cfg["BLOCK_M"],
                       BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PDL=pdl, EARLY=early, L2=l2,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl)


class Layers:
    def __init__(self, m: int, attn_mb: float, g: torch.Generator):
        dev, dt = "cuda", torch.bfloat16

        def rnd(*shape, s=0.02):
            return (torch.randn(*shape, device=dev, generator=g) * s).to(dt)

        self.m = m
        self.w = [dict(qkv=rnd(Q + 2 * KV, HIDDEN), o=rnd(HIDDEN, Q), gu=rnd(2 * INTER, HIDDEN),
                       d=rnd(HIDDEN, INTER), n1=1 + rnd(HIDDEN, s=0.1), n2=1 + rnd(HIDDEN, s=0.1))
                  for _ in range(LAYERS)]
        self.chunk = 64 * 1024
        self.programs = max(m, int(attn_mb * 2**20) // self.chunk)
        self.buf = [rnd(self.programs * self.chunk // 2, s=1.0) for _ in range(LAYERS)]
        self.h0, self.res0 = rnd(m, HIDDEN, s=1.0), rnd(m, HIDDEN, s=1.0)
        self.h, self.res = torch.empty_like(self.h0), torch.empty_like(self.res0)
        self.x = torch.empty(m, HIDDEN, device=dev, dtype=dt)
        self.qkv = torch.empty(m, Q + 2 * KV, device=dev, dtype=dt)
        self.attn = torch.empty(m, Q, device=dev, dtype=dt)
        self.o = torch.empty(m, HIDDEN, device=dev, dtype=dt)
        self.act = torch.empty(m, INTER, device=dev, dtype=dt)

    def run(self, cublas: bool, pdl: bool, early: bool = False, l2: bool = False):
        m = self.m
        self.h.copy_(self.h0)
        self.res.copy_(self.res0)
        for w, buf in zip(self.w, self.buf):
            _add_norm_kernel[(m,)](self.h, self.res, w["n1"], self.x, HIDDEN, self.h.stride(0), 1e-6, BLOCK=HIDDEN,
                                   PDL=pdl, EARLY=early, num_warps=4, launch_pdl=pdl)
            if cublas:
                torch.mm(self.x, w["qkv"].t(), out=self.qkv)
            else:
                gemm(self.x, w["qkv"], self.qkv, False, pdl, early, l2)
            _attn_stand_in_kernel[(self.programs,)](self.qkv, self.attn, buf, m, self.qkv.stride(0), CHUNK=self.chunk,
                                                    WIDTH=Q, PDL=pdl, EARLY=early, num_warps=4, launch_pdl=pdl)
            if cublas:
                torch.mm(self.attn, w["o"].t(), out=self.o)
            else:
                gemm(self.attn, w["o"], self.o, False, pdl, early, l2)
            _add_norm_kernel[(m,)](self.o, self.res, w["n2"], self.x, HIDDEN, self.o.stride(0), 1e-6, BLOCK=HIDDEN,
                                   PDL=pdl, EARLY=early, num_warps=4, launch_pdl=pdl)
            gemm(self.x, w["gu"], self.act, True, pdl, early, l2)
            if cublas:
                torch.mm(self.act, w["d"].t(), out=self.h)
            else:
                gemm(self.act, w["d"], self.h, False, pdl, early, l2)
        return self.h.clone()


VARIANTS = {"engine": dict(cublas=True, pdl=False), "triton": dict(cublas=False, pdl=False),
            "pdl": dict(cublas=False, pdl=True), "pdl+l2": dict(cublas=False, pdl=True, l2=True),
            "pdl early": dict(cublas=False, pdl=True, early=True, l2=True),
            "engine+pdl": dict(cublas=True, pdl=True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="8,32,64,128,224")
    ap.add_argument("--attn-mb", type=float, default=24.0, help="MB the attention stand-in reads a layer")
    ap.add_argument("--out", default="/tmp/nanovllm-pdl")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for m in (int(r) for r in args.rows.split(",")):
        layers = Layers(m, args.attn_mb, g)
        ref = layers.run(cublas=False, pdl=False)
        eng = layers.run(cublas=True, pdl=False)
        line = {"rows": m}
        for name, kw in VARIANTS.items():
            out = layers.run(**kw)
            same = bool(torch.equal(out, eng if kw["cublas"] else ref))
            line[name] = round(graph_us(lambda kw=kw, ls=layers: ls.run(**kw)), 2)
            if not same:
                line[name + " (DIFFERS)"] = float((out.float() - (eng if kw["cublas"] else ref).float()).abs().max())
        line["engine again"] = round(graph_us(lambda ls=layers: ls.run(cublas=True, pdl=False)), 2)
        print(json.dumps(line), flush=True)
        rows.append(line)
        del layers
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pdl_check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
