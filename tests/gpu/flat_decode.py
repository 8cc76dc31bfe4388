"""The flat FP8 decode kernel (``flat_decode_attention`` in nanovllm/attention/triton_kernels.py, off in the backend:
``TritonBackend.fp8_flat``) against the package's split kernel on a GPU: its launch variants timed, and the seed
benchmark with it (a script for a GPU machine; the kernels are tested on a CPU by tests/test_flat_decode.py in
Triton's interpreter).

Why: the package's FP8 decode kernel reads the cache at ~2.35 TB/s where the bfloat16 kernel reads at ~2.97
(figures/data/fp8_words_h100.txt). An FP8 program reads half the bytes of a bfloat16 one in the same number of
steps, so whatever a program costs besides its reads weighs twice as much: its start (the context length, then the
block table, then the first tiles: a chain of dependent DRAM reads with nothing in flight), its end (the store), the
launch of the program after it, and the last programs of the kernel running with the GPU half empty. Here the grid
is as many programs as the GPU holds at once (``programs_per_sm`` x SMs). The batch's (sequence, KV head) items are
laid end to end, tile after tile, and program ``p`` takes the ``p``-th equal run of tiles: every program reads the
same number of tiles, whatever the contexts. One loop runs over the program's tiles whatever item they belong to,
so the software pipeline loads the next item's first tiles while the last ones of the item before are still in
the products. Where an item's tiles fall to two or more programs, each writes its part's output and log-sum-exp and
a second, small kernel combines them (and writes zeros for a row of no context, as a CUDA graph's padding).

The tiles come as the package's kernel reads them (16-bit words widened by the GPU's own instruction; any block
size), or by TMA (``tma=True``: one 128-token cache block a tile, as tests/gpu/tma_decode.py).

On a GPU (checks against the package's kernel, then times both from CUDA graphs over the seed benchmark's batches,
28 layers each its own cache, then the seed benchmark with it):

    PYTHONPATH=. python3 tests/gpu/flat_decode.py [--steps 200,600,900] [--variants ...] [--bench]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from nanovllm.attention import triton_kernels as tk  # noqa: E402

BLOCK_N = tk.FLAT_BLOCK_N


def flat_decode(*args, **kwargs):
    """The package's flat decode (looked up at each call: the tests define the kernels again for the interpreter)."""
    return tk.flat_decode_attention(*args, **kwargs)


def variants(args):
    """(name, block size, the launch over (q, k, v, tables, lens, scale, k_scale, v_scale)) to time."""
    from tma_decode import tma_decode

    eng = dict(f16_dot=True, fp8_words=tk.TritonBackend.fp8_words, fp8_words_k=tk.TritonBackend.fp8_words_k)
    out = [("package kernel, blocks of 16", 16, lambda *a: tk.paged_decode_attention(*a[:6], k_scale=a[6],
                                                                                      v_scale=a[7], **eng))]
    for v in args.variants.split(","):  # words@PPSMxSTAGES or tma@PPSMxSTAGES, then q (q carried), a (bt_ahead)
        how, cfg = v.split("@")
        carried, ahead = "q" in cfg, "a" in cfg
        ppsm, stages = map(int, cfg.rstrip("qa").split("x"))
        tma = how == "tma"
        out.append((f"flat {'tma' if tma else 'words'}, {ppsm} programs an SM, {stages} stages"
                    f"{', q carried' if carried else ''}{', block table ahead' if ahead else ''}", 128 if tma else 16,
                    lambda *a, tma=tma, ppsm=ppsm, stages=stages, carried=carried, ahead=ahead, **kw: flat_decode(
                        *a, tma=tma, programs_per_sm=ppsm, num_stages=stages, q_carried=carried, bt_ahead=ahead,
                        **kw)))
    out += [("package kernel, blocks of 128", 128, lambda *a: tk.paged_decode_attention(*a[:6], k_scale=a[6],
                                                                                        v_scale=a[7], **eng)),
            ("tma_decode (one program an item)", 128, lambda *a: tma_decode(*a, num_stages=2, num_warps=4)),
            ("package kernel, blocks of 16, again", 16, out[0][2])]
    return out


def check(launches):
    """Every launch against the package's over scattered blocks with lengths around the tile edges, a row of no
    context among them and stale NaN bytes past each context in its last block; Qwen3-0.6B's heads and
    SmolLM2-135M's."""
    from decode_sweep import HKV, D, H, fp8_check_inputs

    ok = True
    for h, hkv, d in ((H, HKV, D), (9, 3, 64)):
        for bs in (16, 128):
            q, k, v, tables, lens, ks, vs = fp8_check_inputs([1, 5, 127, 0, 128, 129, 300, 511, 600, 33, 2000, 4000],
                                                             bs, h, hkv, d)
            ref = tk.paged_decode_attention(q, k, v, tables, lens, d ** -0.5, k_scale=ks, v_scale=vs, f16_dot=True,
                                            fp8_words="asm", fp8_words_k=True).float()
            for name, block, fn in launches:
                if block != bs:
                    continue
                for programs in (None, 7) if name.startswith("flat") else (None,):
                    kw = {} if programs is None else dict(programs=programs)
                    got = (fn(q, k, v, tables, lens, d ** -0.5, ks, vs, **kw) if kw else
                           fn(q, k, v, tables, lens, d ** -0.5, ks, vs)).float()
                    err = (got - ref).abs().max().item()
                    good = err < 2e-2
                    ok &= good
                    print(f"check heads {h}/{hkv} d {d} blocks of {bs}, {name}{', 7 programs' if kw else ''}: "
                          f"max |x - package| = {err:.4g} {'PASS' if good else 'FAIL'}", flush=True)
    return ok


def main():
    from decode_sweep import HKV, D, fp8_layer_caches, fp8_step_inputs
    from gemm_check import chain, graph_us

    from nanovllm.bench import seed_workload

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="200,600,900")
    ap.add_argument("--variants",
                    default="words@3x2,words@3x2q,words@6x2,words@2x3a,words@2x3qa,tma@3x2,tma@3x2q,tma@2x3a",
                    help="flat launches to time: words or tma @ programs an SM x pipeline stages, then q for q "
                         "carried, a for the block table read ahead")
    ap.add_argument("--bench", action="store_true",
                    help="also the seed benchmark with the flat kernel (words, blocks of 16; tma, blocks of 128)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("flat_decode.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(0), torch.__version__, "triton", triton.__version__, flush=True)
    launches = variants(args)
    if not check(launches):
        print("FAIL: a flat launch differs from the package's; no timings", flush=True)
        return 1

    w = seed_workload()
    ones = torch.ones(HKV, device="cuda")
    for step in map(int, args.steps.split(",")):
        ctx, bucket, lens, q, nbytes = fp8_step_inputs(w, step)
        caches = {bs: fp8_layer_caches(ctx, bucket, bs) for bs in (16, 128)}
        res = []
        for name, bs, fn in launches:
            k, v, tables = caches[bs]
            try:
                us = graph_us(chain(tables, lambda t, fn=fn, k=k, v=v, q=q, lens=lens: fn(
                    q, k, v, t, lens, D ** -0.5, ones, ones)))
                res.append(f"{name} {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s)")
            except Exception as e:  # noqa: BLE001
                res.append(f"{name}: {type(e).__name__} {str(e)[:160]}")
        print(f"step {step} batch {len(ctx)}:\n  " + "\n  ".join(res), flush=True)
        del caches
        torch.cuda.empty_cache()
    if args.bench:
        bench()
    return 0


def in_the_package(tma: bool, programs_per_sm: int | None = None, num_stages: int = 2):
    """A ``with`` block in which the package's decode attention over an FP8 cache is the flat kernel (with ``tma``,
    where the cache's blocks are of 128 tokens)."""
    from decode_sweep import package_decode_replaced

    def make(package):
        def with_flat(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None, out=None,
                      k_scale=None, v_scale=None, **kw):
            if k_scale is not None and q.stride(-1) == 1 and (not tma or k_cache.shape[1] == BLOCK_N):
                return flat_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale,
                                   out=out, tma=tma, programs_per_sm=programs_per_sm, num_stages=num_stages)
            return package(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=num_splits, out=out,
                           k_scale=k_scale, v_scale=v_scale, **kw)
        return with_flat

    return package_decode_replaced(make)


def bench():
    """The seed benchmark with an FP8 cache: the package's kernel, the flat one (words, blocks of 16; TMA, blocks of
    128), the package's again."""
    from nanovllm import bench as nb

    runs = (("package kernel, blocks of 16", None, 16), ("flat words, blocks of 16", False, 16),
            ("flat tma, blocks of 128", True, 128), ("package kernel, blocks of 128", None, 128),
            ("package kernel, blocks of 16, again", None, 16))
    for name, tma, bs in runs:
        argv = ["--engine", "nanovllm", "--kv-cache-dtype", "fp8", "--kvcache-block-size", str(bs)]
        with in_the_package(tma) if tma is not None else contextlib.nullcontext():
            try:
                [r] = nb.main(argv)
                print(f"seed benchmark, fp8, {name}: {r.tok_per_s:,.0f} tok/s", flush=True)
            except SystemExit as e:
                print(f"seed benchmark, {name}: failed ({e.code})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
