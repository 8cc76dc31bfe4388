"""An experiment: FP8 decode attention whose K and V tiles arrive by TMA (the Hopper tensor-memory accelerator), one
cache block of 128 tokens a tile (not part of the package; a script for a GPU machine, its kernel also tested on a
CPU by tests/test_tma_decode.py in Triton's interpreter).

Why: Nsight Compute found the package's FP8 decode kernel waiting on shared memory (figures/data/fp8_words_h100.txt
section 12: L1/shared 73 % busy, 28 % of its wavefronts bank conflicts: the cp.async buffers of the 16-bit words,
laid out unswizzled by Triton 3.6). A TMA copy writes a tile into shared memory swizzled, in one instruction for the
whole tile, with no per-thread address arithmetic. TMA copies a box of a dense tensor, so a tile must be one cache
block: the cache is viewed as [num_blocks x block_size, kv_heads x head_dim] and a tile is the box at row
``block x block_size``, column ``kv_head x head_dim``; the engine's default blocks of 16 tokens would make 16-token
tiles, so this needs ``kvcache_block_size=128`` (the block size did not matter to the package's kernel:
fp8_words_h100.txt section 18). The products and the online softmax are the package kernel's (float16 products,
K's scale in the softmax scale, V's on the output); rows past a sequence's context in its last block are zeroed in
V (TMA cannot mask them, and stale bytes may be NaN) and masked out of the scores.

On a GPU (checks against the package's kernel, then times both from CUDA graphs over the seed benchmark's batches,
28 layers each its own cache):

    PYTHONPATH=. python3 tests/gpu/tma_decode.py [--steps 200,600,900] [--tilings 2x4,3x4,2x8] [--bench]
    PYTHONPATH=. python3 tests/gpu/tma_decode.py --trace   # trace.py's steps with either kernel

(Compiled for sm_90 by Triton 3.6: per tile, TMA copies (cp.async.bulk.tensor) behind mbarrier waits, e4m3 widened
by cvt.rn.f16x2.e4m3x2, mma.sync products; ~74 KB of shared memory at 2 stages, as the package's launch. On an H100,
2026-12-07 (fp8_words_h100.txt section 25): the same outputs as the package's kernel bit for bit, ~10 % less time a
layer at batches 218 and 101 (2.60 TB/s against 2.35), and +1.7-2.7 % in the seed benchmark, all of it at batches
65-192.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from nanovllm.triton_utils import next_pow2  # noqa: E402

BLOCK = 128  # tokens a cache block and a tile


@triton.jit
def _tma_decode_kernel(
    q_ptr, k_desc, v_desc, bt_ptr, ctx_ptr, ks_ptr, vs_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_btb, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_V: tl.constexpr,  # zero V's rows past the context (False: only to time what the select costs)
):
    kvh = tl.program_id(0)  # a sequence's KV heads side by side in launch order, as the package's launch
    seq = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    num_tiles = tl.cdiv(ctx, BLOCK_N)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    qk_scale = qk_scale * tl.load(ks_ptr + kvh)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    col = kvh * HEAD_DIM
    for t in range(0, num_tiles):
        row = tl.load(bt_row + t) * BLOCK_N  # the tile is the sequence's t-th cache block
        n_mask = t * BLOCK_N + offs_n < ctx
        k = k_desc.load([row, col]).to(tl.float16)  # [BLOCK_N, HEAD_DIM]
        qk = tl.dot(q, tl.trans(k))
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([row, col]).to(tl.float16)
        if MASK_V:
            v = tl.where(n_mask[:, None], v, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None] * tl.load(vs_ptr + kvh)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def tma_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale, out=None,
               num_stages: int = 2, num_warps: int = 4, mask_v: bool = True):
    """Decode attention over an FP8 cache [num_blocks, 128, kv_heads, head_dim] (blocks of 128 tokens; head_dim a
    power of two, 16 or more): ``q`` [B, H, D] -> [B, H, D], as ``paged_decode_attention`` with one split."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if block_size != BLOCK:
        raise ValueError(f"the TMA kernel reads one cache block a tile: it needs blocks of {BLOCK} tokens, "
                         f"got {block_size}")
    if k_cache.dtype != torch.float8_e4m3fn or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the TMA kernel reads a contiguous e4m3 cache")
    if q.stride(-1) != 1:
        raise ValueError("the TMA kernel reads q's head dimension contiguous")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two of 16 or more, got {head_dim}")
    batch, num_heads, _ = q.shape
    group = num_heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    descs = [TensorDescriptor.from_tensor(c.view(num_blocks * block_size, kv_heads * head_dim), [BLOCK, head_dim])
             for c in (k_cache, v_cache)]
    _tma_decode_kernel[(kv_heads, batch)](
        q, *descs, block_tables, context_lens, k_scale, v_scale, out,
        float(scale) * 1.4426950408889634,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(next_pow2(group), 16), HEAD_DIM=head_dim, BLOCK_N=BLOCK, MASK_V=mask_v,
        num_stages=num_stages, num_warps=num_warps,
    )
    return out


def main():
    from decode_sweep import HKV, D, H, fp8_check_inputs, fp8_layer_caches, fp8_step_inputs
    from gemm_check import chain, graph_us

    from nanovllm.attention import triton_kernels as tk
    from nanovllm.bench import seed_workload

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="200,600,900")
    ap.add_argument("--tilings", default="2x4,3x4,2x8", help="pipeline stages x warps of the TMA kernel to time")
    ap.add_argument("--bench", action="store_true",
                    help="also the seed benchmark over an FP8 cache of 128-token blocks, with and without this kernel")
    ap.add_argument("--trace", action="store_true",
                    help="only trace.py's decode steps under the profiler, with the package's kernel and this one")
    args = ap.parse_args()
    tilings = [tuple(map(int, t.split("x"))) for t in args.tilings.split(",")]
    if not torch.cuda.is_available():
        sys.exit("tma_decode.py needs a CUDA GPU")
    if args.trace:
        return trace(*tilings[0])
    eng = dict(f16_dot=True, fp8_words=tk.TritonBackend.fp8_words, fp8_words_k=tk.TritonBackend.fp8_words_k)
    print(torch.cuda.get_device_name(0), torch.__version__, "triton", triton.__version__, flush=True)

    # correctness: scattered blocks of 128, lengths around the tile edges; Qwen3-0.6B's heads and SmolLM2-135M's
    for h, hkv, d in ((H, HKV, D), (9, 3, 64)):
        q, k, v, tables, lens, ks, vs = fp8_check_inputs([1, 5, 127, 128, 129, 300, 511, 600, 33, 2000], BLOCK, h,
                                                         hkv, d)
        ref = tk.paged_decode_attention(q, k, v, tables, lens, d ** -0.5, k_scale=ks, v_scale=vs, num_splits=1,
                                        **eng).float()
        for st, wp in tilings:
            got = tma_decode(q, k, v, tables, lens, d ** -0.5, ks, vs, num_stages=st, num_warps=wp).float()
            err = (got - ref).abs().max().item()
            print(f"check heads {h}/{hkv} d {d} {st} stages {wp} warps: max |tma - triton| = {err:.4g} "
                  f"{'PASS' if err < 2e-2 else 'FAIL'}", flush=True)

    w = seed_workload()
    ones = torch.ones(HKV, device="cuda")
    for step in map(int, args.steps.split(",")):
        ctx, bucket, lens, q, nbytes = fp8_step_inputs(w, step)
        res = []
        for bs in (16, BLOCK):  # the engine's blocks of 16 (the package's kernel), and of 128 (both kernels)
            k, v, tables = fp8_layer_caches(ctx, bucket, bs)

            def triton_call(t, q=q, k=k, v=v, lens=lens):
                tk.paged_decode_attention(q, k, v, t, lens, D ** -0.5, k_scale=ones, v_scale=ones, **eng)

            calls = [(f"triton, blocks of {bs}", triton_call)]
            if bs == BLOCK:  # and, at the first tiling, what zeroing V's rows past the context costs (no NaN here)
                variants = [(st, wp, True) for st, wp in tilings] + [(*tilings[0], False)]
                for st, wp, mask_v in variants:
                    def tma_call(t, q=q, k=k, v=v, lens=lens, st=st, wp=wp, mask_v=mask_v):
                        tma_decode(q, k, v, t, lens, D ** -0.5, ones, ones, num_stages=st, num_warps=wp,
                                   mask_v=mask_v)

                    calls.append((f"tma, {st} stages {wp} warps{'' if mask_v else ', V unmasked'}", tma_call))
            for name, fn in calls:
                try:
                    us = graph_us(chain(tables, fn))
                    res.append(f"{name} {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s)")
                except Exception as e:  # noqa: BLE001
                    res.append(f"{name}: {type(e).__name__} {str(e)[:160]}")
            del k, v
            torch.cuda.empty_cache()
        print(f"step {step} batch {len(ctx)}: " + "; ".join(res), flush=True)
    if args.bench:
        bench(*tilings[0])


def in_the_package(stages: int, warps: int):
    """A ``with`` block in which the package's decode attention is this kernel wherever the package's launch would
    take one split over an FP8 cache of 128-token blocks (elsewhere the package's launch stays)."""
    from decode_sweep import package_decode_replaced

    from nanovllm.attention import triton_kernels as tk

    def make(package):
        def with_tma(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None, k_scale=None,
                     v_scale=None, **kw):
            one_split = num_splits == 1 or (num_splits is None and tk.pick_num_splits(
                q.shape[0], k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1], tk.num_sms(q.device),
                128) == 1)
            if (k_scale is not None and k_cache.shape[1] == BLOCK and one_split and kw.get("out") is None
                    and q.stride(-1) == 1):
                return tma_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                  num_stages=stages, num_warps=warps)
            return package(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=num_splits,
                           k_scale=k_scale, v_scale=v_scale, **kw)
        return with_tma

    return package_decode_replaced(make)


def bench(stages: int, warps: int):
    """The seed benchmark with an FP8 cache of 128-token blocks: the package's kernel, then this one wherever the
    package's launch would take one split, then the package's again."""
    from nanovllm import bench as nb

    argv = ["--engine", "nanovllm", "--kv-cache-dtype", "fp8", "--kvcache-block-size", str(BLOCK)]
    runs = (("package kernel", False), (f"tma kernel ({stages} stages, {warps} warps) at one split", True),
            ("package kernel again", False))
    for name, tma in runs:
        with in_the_package(stages, warps) if tma else contextlib.nullcontext():
            try:
                [r] = nb.main(argv)
                print(f"seed benchmark, fp8, blocks of {BLOCK}, {name}: {r.tok_per_s:,.0f} tok/s", flush=True)
            except SystemExit as e:
                print(f"seed benchmark, {name}: failed ({e.code})", flush=True)


def trace(stages: int, warps: int):
    """trace.py's decode steps under the profiler (GPU busy and idle time a step, kernel by kernel), FP8 cache of
    128-token blocks, with the package's kernel and with this one: whether a step's GPU time falls with it."""
    import importlib.util  # tests/gpu/trace.py by its path: the standard library has a module of that name

    spec = importlib.util.spec_from_file_location("gpu_trace", os.path.join(HERE, "trace.py"))
    nanovllm_trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanovllm_trace)

    for tma in (False, True):
        print(f"== trace, {'tma kernel' if tma else 'package kernel'}", flush=True)
        sys.argv = ["trace.py", "--kv-cache-dtype", "fp8", "--block-size", str(BLOCK)]
        with in_the_package(stages, warps) if tma else contextlib.nullcontext():
            nanovllm_trace.main()


if __name__ == "__main__":
    main()
