"""Sweep the decode-attention kernel's launch settings and the KV-cache layout on a GPU (a script, not a
pytest module).

    PYTHONPATH=. python3 tests/gpu/decode_sweep.py [--out DIR] [--steps 20,200,...]
    PYTHONPATH=. python3 tests/gpu/decode_sweep.py --graph  # the engine's settings vs alternatives, as decode runs them
    PYTHONPATH=. python3 tests/gpu/decode_sweep.py --graph --fp8  # the same over an FP8 cache
    PYTHONPATH=. python3 tests/gpu/decode_sweep.py --read   # the GPU's streaming-read ceiling

The batches are the seed benchmark's own: at decode step ``s`` the running sequences are those asking
for more than ``s`` tokens, each with ``prompt_len + s`` tokens of context.  For each of a few steps it
times ``paged_decode_attention`` (one layer of Qwen3-0.6B: 16 query heads, 8 KV heads, head_dim 128,
bf16, blocks of 16 scattered at random) for two cache layouts:

* ``NHD``: ``[num_blocks, block_size, kv_heads, head_dim]`` in memory, a head's 16 rows of a block
  256 bytes each, 2 KiB apart;
* ``HND``: ``[num_blocks, kv_heads, block_size, head_dim]`` in memory (passed to the kernel as the same
  logical shape through strides), a head's block one contiguous 4 KiB run;

and for each BLOCK_N / num_warps / num_stages / split count.  Prints achieved TB/s of K/V read per
setting, and the best one per step.

``--graph`` times as the engine runs the kernel: 28 layers (each its own cache, so nothing is read from L2
that a layer before left there) replayed from one CUDA graph, the batch padded to its graph bucket, the
sequences' blocks consecutive as the block manager hands them out; the engine's own choice
(``decode_launch``) against alternatives.  (Results of past runs: figures/data/gpu_decode_experiments.txt,
figures/data/kernel_measurements.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import sys
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # gemm_check, beside this file
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

from nanovllm.attention import triton_kernels as tk  # noqa: E402
from nanovllm.bench import seed_workload  # noqa: E402
from nanovllm.engine.cuda_graphs import graph_batch_sizes  # noqa: E402

H, HKV, D, BS = 16, 8, 128, 16


def batch_at_step(w, step: int) -> list[int]:
    ctx = [len(p) + step for p, n in zip(w.prompts, w.max_tokens) if n > step]
    return sorted(ctx, reverse=True)  # the engine runs decode batches longest first


def consecutive_tables(per_seq: list[int], rows: int, first: int = 0) -> torch.Tensor:
    """Block tables [rows, 4096 // BS] on the GPU: the sequences' blocks consecutive from block ``first``, as the
    block manager hands them out (rows past ``len(per_seq)``: the graph bucket's padding, all zeros)."""
    t = torch.zeros(rows, 4096 // BS, dtype=torch.int32)
    for i, n in enumerate(per_seq):
        t[i, :n] = torch.arange(first, first + n, dtype=torch.int32)
        first += n
    return t.cuda()


def graph_inputs(ctx: list[int]):
    """What the engine's decode graph for this batch reads, one layer's worth each for ``LAYERS`` layers: the
    blocks a layer's sequences take (its cache holds ``LAYERS`` times as many, plus 8), each layer's block tables
    (layer after layer in the cache), the context lengths and the queries, padded to the batch's graph bucket."""
    from gemm_check import LAYERS

    bucket = next(b for b in graph_batch_sizes(256) if b >= len(ctx))  # the engine's graph buckets
    per_seq = [-(-c // BS) for c in ctx]
    nb = sum(per_seq)
    tables = [consecutive_tables(per_seq, bucket, layer * nb) for layer in range(LAYERS)]
    lens = torch.zeros(bucket, dtype=torch.int32, device="cuda")
    lens[:len(ctx)] = torch.tensor(ctx)
    q = torch.randn(bucket, H, D, device="cuda", dtype=torch.bfloat16)
    return nb, tables, lens, q


def make_cache(ctx: list[int], layout: str, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_seq = [-(-c // BS) for c in ctx]
    num_blocks = sum(per_seq) + 8
    shape = (num_blocks, BS, HKV, D) if layout == "NHD" else (num_blocks, HKV, BS, D)
    k = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16)
    if layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = torch.full((len(ctx), 4096 // BS), -1, dtype=torch.int32)
    at = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    return k, v, tables.cuda(), torch.tensor(ctx, dtype=torch.int32, device="cuda")


def scattered_fp8_cache(lens: list[int], block_size: int, kv_heads: int, head_dim: int, gen: torch.Generator):
    """A random e4m3 K and V cache [blocks, block_size, kv_heads, head_dim] on ``gen``'s device, and block tables
    [len(lens), most blocks] (int32, on the CPU) giving each sequence its ``lens[i]`` tokens (at least one block)
    in blocks scattered at random: the correctness checks' cache."""
    per = [max(-(-int(n) // block_size), 1) for n in lens]
    nb = sum(per) + 4
    k, v = ((torch.randn(nb, block_size, kv_heads, head_dim, device=gen.device, generator=gen) * 2)
            .to(torch.float8_e4m3fn) for _ in range(2))
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(1))
    tables = torch.zeros(len(per), max(per), dtype=torch.int32)
    at = 0
    for i, n in enumerate(per):
        tables[i, :n] = perm[at:at + n]
        at += n
    return k, v, tables


def fp8_check_inputs(lens: list[int], block_size: int, heads: int, kv_heads: int, head_dim: int):
    """The experiments' correctness check on a GPU: a scattered e4m3 cache (``scattered_fp8_cache``) with NaN bytes
    (0x7F) past each context in its last block, in K and in V; its block tables, the context lengths, bfloat16
    queries and per-head scales, all on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v, tables = scattered_fp8_cache(lens, block_size, kv_heads, head_dim, g)
    for i, n in enumerate(lens):
        if n % block_size:
            for c in (k, v):
                c.view(torch.uint8)[int(tables[i, (n - 1) // block_size]), n % block_size:] = 0x7F
    q = torch.randn(len(lens), heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    ks = torch.rand(kv_heads, device="cuda", generator=g) + 0.5
    vs = torch.rand(kv_heads, device="cuda", generator=g) + 0.5
    return q, k, v, tables.cuda(), torch.tensor(lens, dtype=torch.int32, device="cuda"), ks, vs


def fp8_step_inputs(w, step: int):
    """The seed benchmark's decode batch at ``step`` as the experiments time it: the contexts, the batch's graph
    bucket, the context lengths (padded with zeros to the bucket) and queries on the GPU, and the bytes of FP8 cache
    one layer reads."""
    ctx = batch_at_step(w, step)
    bucket = next(b for b in graph_batch_sizes(256) if b >= len(ctx))
    lens = torch.zeros(bucket, dtype=torch.int32, device="cuda")
    lens[:len(ctx)] = torch.tensor(ctx)
    q = torch.randn(bucket, H, D, device="cuda", dtype=torch.bfloat16)
    return ctx, bucket, lens, q, sum(ctx) * HKV * D * 2


def fp8_layer_caches(ctx: list[int], bucket: int, block_size: int):
    """Random e4m3 K and V caches of blocks of ``block_size`` for ``LAYERS`` layers, and each layer's block tables
    [bucket, most blocks] on the GPU: each layer its own blocks, a sequence's consecutive (as the block manager
    hands them out)."""
    from gemm_check import LAYERS

    per = [-(-c // block_size) for c in ctx]
    nb = sum(per)
    tables = []
    for layer in range(LAYERS):
        t = torch.zeros(bucket, max(per), dtype=torch.int32)
        first = layer * nb
        for i, n in enumerate(per):
            t[i, :n] = torch.arange(first, first + n, dtype=torch.int32)
            first += n
        tables.append(t.cuda())
    k = torch.randn(nb * LAYERS + 8, block_size, HKV, D, device="cuda").to(torch.float8_e4m3fn)
    v = torch.randn(nb * LAYERS + 8, block_size, HKV, D, device="cuda").to(torch.float8_e4m3fn)
    return k, v, tables


@contextlib.contextmanager
def package_decode_replaced(make):
    """For the ``with`` block, the package's decode attention (what the engine's backend calls) replaced by
    ``make(package_decode)``: the experiments' kernels in the seed benchmark and the traces."""
    package = tk.paged_decode_attention
    tk.paged_decode_attention = make(package)
    try:
        yield
    finally:
        tk.paged_decode_attention = package


def read_bandwidth() -> None:
    """What the GPU reads per second at best: a plain streaming-sum kernel over 2 GiB of bf16."""
    import triton
    import triton.language as tl
    from triton.testing import do_bench

    @triton.jit
    def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, 0))

    x = torch.ones(1 << 30, device="cuda", dtype=torch.bfloat16)
    sms = tk.num_sms(torch.device("cuda"))
    for progs_per_sm, block, warps in ((4, 4096, 8), (8, 2048, 4), (16, 2048, 4), (32, 1024, 4)):
        out = torch.empty(progs_per_sm * sms, device="cuda")
        grid = (progs_per_sm * sms,)
        us = do_bench(lambda grid=grid, out=out, block=block, warps=warps: _sum_kernel[grid](
            x, out, x.numel(), BLOCK=block, num_warps=warps), warmup=10, rep=100) * 1e3
        print(f"streaming read: {progs_per_sm} programs/SM, BLOCK {block}, {warps} warps: "
              f"{x.numel() * 2 / us / 1e6:.2f} TB/s", flush=True)
    us = do_bench(lambda: x.sum(), warmup=10, rep=100) * 1e3
    print(f"torch sum: {x.numel() * 2 / us / 1e6:.2f} TB/s", flush=True)
    y = torch.empty_like(x)
    us = do_bench(lambda: y.copy_(x), warmup=10, rep=100) * 1e3
    print(f"torch copy: {x.numel() * 4 / us / 1e6:.2f} TB/s (read + write)", flush=True)


def graph_sweep(w, steps: list[int], fp8: bool = False, out: str | None = None, quick: bool = False,
                match: tuple[str, ...] = ()) -> None:
    """``fp8``: an e4m3 cache (scales of 1): the backend's launch (``TritonBackend``: float16 products, K and V
    read as 16-bit words widened by inline PTX) with other tilings, warps and split counts, against reading V or
    K as bytes, Triton's conversion, and bfloat16 products (256-token tiles among the alternatives: a tile of
    half the bytes may want twice the tokens); then the backend's launch over a bfloat16 cache on the same batch,
    for what FP8 saves, and over an FP8 cache laid out HND (a head's rows of a block contiguous).
    ``out``: every launch's time, fastest first, in ``graph_sweep_fp8.txt`` there."""
    from gemm_check import LAYERS, chain, graph_us

    sms = tk.num_sms(torch.device("cuda"))
    for step in steps:
        ctx = batch_at_step(w, step)
        if not ctx:
            continue
        nb, tables, lens, q = graph_inputs(ctx)
        bucket = len(lens)
        k = torch.randn(nb * LAYERS + 8, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        scales = {}
        if fp8:
            k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
            ones = torch.ones(HKV, device="cuda")
            scales = dict(k_scale=ones, v_scale=ones)
        tile_sizes = (64, 128, 256) if fp8 else (64, 128)
        heur = tk.pick_num_splits(bucket, HKV, 4096, sms)
        opts = [("engine", {})]
        if heur == 1:
            for bn, st, hf in itertools.product(tile_sizes, (2, 3), (False, True)):
                opts.append((f"bn{bn} st{st}{' heads-first' if hf else ''}",
                             dict(block_n=bn, num_stages=st, heads_first=hf)))
        else:
            for sp, bn, st in itertools.product(sorted({heur, 2, 4, 8, 16}), tile_sizes, (2, 3, 4)):
                opts.append((f"splits {sp} bn{bn} st{st}", dict(num_splits=sp, block_n=bn, num_stages=st)))
        if fp8:  # the backend's launch (float16 products, K and V read as words), its tilings and the older reads
            eng = dict(f16_dot=True, fp8_words=tk.TritonBackend.fp8_words, fp8_words_k=tk.TritonBackend.fp8_words_k)
            tilings = (("", {}), (" bn128 st2", dict(block_n=128, num_stages=2)),
                       (" bn128 st2 heads-first", dict(block_n=128, num_stages=2, heads_first=True)),
                       (" bn64 st4", dict(block_n=64, num_stages=4)), (" 2 warps", dict(num_warps=2)),
                       (" bn64 2 warps", dict(block_n=64, num_warps=2)), (" 8 warps", dict(num_warps=8)),
                       (" splits 2", dict(num_splits=2)), (" splits 2 bn128 st3", dict(num_splits=2, block_n=128)),
                       # one stage: no cp.async buffers (the tiles go from global memory to registers), fewer
                       # registers and less shared memory a program, so more programs an SM
                       (" bn128 st1", dict(block_n=128, num_stages=1)), (" bn64 st1", dict(block_n=64, num_stages=1)),
                       (" bn32 st1", dict(block_n=32, num_stages=1)), (" bn64 st2", dict(block_n=64, num_stages=2)),
                       (" bn128 st1 8 warps", dict(block_n=128, num_stages=1, num_warps=8)))
            opts = [("engine", eng)] + [(f"engine{name}", dict(eng, **kw)) for name, kw in tilings[1:]] + [
                ("V as words (asm), K as bytes", dict(eng, fp8_words_k=False)),
                ("K and V as words (convert)", dict(eng, fp8_words="convert")),
                ("V as words (convert), K as bytes", dict(eng, fp8_words="convert", fp8_words_k=False)),
                ("bytes, float16 products", dict(f16_dot=True)), ("bytes, bfloat16 products", {})] + \
                [(f"bytes f16 {name}", dict(kw, f16_dot=True)) for name, kw in opts[1:]]
        if quick:  # the engine's launch and its other tilings only (and, with fp8, the bfloat16 cache's below)
            opts = [o for o in opts if o[0].startswith("engine")]
        if match:  # the engine's launch and those named so
            opts = opts[:1] + [o for o in opts[1:] if any(m in o[0] for m in match)]
        res = []
        # the engine's launch also once more at the end: the first one timed at a step came out 2-6 % slower than
        # the same settings timed later (kernel_measurements.md); its time is the later of the two
        for name, kw in opts + [("engine, timed again last", opts[0][1])]:
            def call(t, kw=kw, q=q, k=k, v=v, lens=lens, scales=scales):
                tk.paged_decode_attention(q, k, v, t, lens, D ** -0.5, **kw, **scales)
            try:
                res.append((graph_us(chain(tables, call)), name))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  {name}: {type(e).__name__} {str(e)[:80]}")
        times = {n: u for u, n in res}
        first, engine = times["engine"], times["engine, timed again last"]
        res = [r for r in res if r[1] != "engine, timed again last"]
        nbytes = sum(ctx) * HKV * D * 2 * k.element_size()
        res.sort()
        print(f"step {step:>4} batch {len(ctx):>3} (bucket {bucket}, {heur} split(s)): engine {engine:.1f} us "
              f"({nbytes / engine / 1e6:.2f} TB/s; timed first {first:.1f}); fastest: "
              + "; ".join(f"{u:.1f} us {n}" for u, n in res[:3]), flush=True)
        if out:  # every launch, fastest first
            with open(Path(out, f"graph_sweep{'_fp8' if fp8 else ''}.txt"), "a") as f:
                f.write(f"step {step} batch {len(ctx)}\n" + "".join(f"  {u:7.1f} us  {n}\n" for u, n in res))
        del k, v
        torch.cuda.empty_cache()
        if fp8:  # the same batch over a bfloat16 cache, as the engine launches it: what FP8 saves per layer
            k = torch.randn(nb * LAYERS + 8, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)

            def call16(t, q=q, k=k, v=v, lens=lens):
                tk.paged_decode_attention(q, k, v, t, lens, D ** -0.5)
            us = graph_us(chain(tables, call16))
            print(f"           the same over a bfloat16 cache: {us:.1f} us ({2 * nbytes / us / 1e6:.2f} TB/s); "
                  f"FP8 saves {1 - engine / us:.0%}", flush=True)
            del k, v
            torch.cuda.empty_cache()
            # the FP8 launch over a cache laid out HND ([blocks, kv_heads, block_size, head_dim] in memory, passed
            # as the same logical shape through strides): a head's 16 rows of a block one 2 KiB run, not 16 runs
            # of 128 bytes 1 KiB apart
            k = torch.randn(nb * LAYERS + 8, HKV, BS, D, device="cuda").to(torch.float8_e4m3fn).transpose(1, 2)
            v = torch.randn(nb * LAYERS + 8, HKV, BS, D, device="cuda").to(torch.float8_e4m3fn).transpose(1, 2)
            for name, kw in (("", opts[0][1]), (", sequence-major", dict(opts[0][1], heads_first=False))):
                def call_hnd(t, kw=kw, q=q, k=k, v=v, lens=lens, scales=scales):
                    tk.paged_decode_attention(q, k, v, t, lens, D ** -0.5, **kw, **scales)
                us = graph_us(chain(tables, call_hnd))
                print(f"           the engine's launch over an HND FP8 cache{name}: {us:.1f} us "
                      f"({nbytes / us / 1e6:.2f} TB/s)", flush=True)
            del k, v
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", default="20,200,400,600,800,900,960")
    ap.add_argument("--read", action="store_true", help="only the streaming-read bandwidth of the GPU")
    ap.add_argument("--graph", action="store_true", help="engine settings vs alternatives, in a CUDA graph")
    ap.add_argument("--fp8", action="store_true", help="with --graph: an FP8 (e4m3) cache")
    ap.add_argument("--match", default="", help="--graph: only the launches whose names hold one of these (a,b)")
    ap.add_argument("--quick", action="store_true",
                    help="with --graph: only the engine's launch and its other tilings (with --fp8: and the "
                         "bfloat16 cache's)")
    args = ap.parse_args()
    from triton.testing import do_bench

    if args.read:
        read_bandwidth()
        return

    w = seed_workload(256)
    if args.graph:
        steps = "20,200,400,600,800,900,940,960,980,1000,1015" if args.steps == ap.get_default("steps") else args.steps
        graph_sweep(w, [int(s) for s in steps.split(",")], fp8=args.fp8, out=args.out, quick=args.quick,
                    match=tuple(m for m in args.match.split(",") if m))
        return
    lines = ["step,batch,sum_ctx,layout,block_n,num_warps,num_stages,num_splits,us,tb_per_s"]
    best_per_step = {}
    for step in [int(s) for s in args.steps.split(",")]:
        ctx = batch_at_step(w, step)
        if not ctx:
            continue
        nbytes = sum(ctx) * HKV * D * 2 * 2
        q = torch.randn(len(ctx), H, D, device="cuda", dtype=torch.bfloat16)
        # the split count a captured graph uses (the block-table width bounds the context)
        graph_bucket = next(b for b in graph_batch_sizes(256) if b >= len(ctx))
        heur = tk.pick_num_splits(graph_bucket, HKV, 4096, tk.num_sms(torch.device("cuda")))
        split_opts = sorted({heur, 1, 2, 4, 8}) if len(ctx) * HKV < 4 * 132 else [heur]
        for layout in ("NHD", "HND"):
            k, v, tables, lens = make_cache(ctx, layout)
            ref = tk.paged_decode_attention(q, k, v, tables, lens, D ** -0.5, num_splits=1)
            for bn, nw, ns, sp in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), split_opts):
                try:
                    def fn(q=q, k=k, v=v, tables=tables, lens=lens, sp=sp, bn=bn, nw=nw, ns=ns):
                        return tk.paged_decode_attention(q, k, v, tables, lens, D ** -0.5, num_splits=sp,
                                                         block_n=bn, num_warps=nw, num_stages=ns)
                    out = fn()
                    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
                    us = do_bench(fn, warmup=10, rep=60) * 1e3
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"step {step} {layout} bn={bn} w={nw} s={ns} sp={sp}: {type(e).__name__} {str(e)[:80]}")
                    continue
                tbs = nbytes / us / 1e6
                lines.append(f"{step},{len(ctx)},{sum(ctx)},{layout},{bn},{nw},{ns},{sp},{us:.1f},{tbs:.3f}")
                key = (step, layout)
                if key not in best_per_step or us < best_per_step[key][0]:
                    best_per_step[key] = (us, tbs, bn, nw, ns, sp)
            default_us = None
            for ln in lines[1:]:
                f = ln.split(",")
                if (int(f[0]), f[3], int(f[4]), int(f[5]), int(f[6]), int(f[7])) == (step, layout, 64, 4, 2, heur):
                    default_us = float(f[8])
            b = best_per_step.get((step, layout))
            print(f"step {step:>4} batch {len(ctx):>3} sum_ctx {sum(ctx):>7} {layout}: default(64,4,2,sp={heur}) "
                  f"{default_us} us ({nbytes / default_us / 1e6 if default_us else 0:.2f} TB/s); best {b[0]:.1f} us "
                  f"{b[1]:.2f} TB/s at bn={b[2]} warps={b[3]} stages={b[4]} splits={b[5]}", flush=True)
            del k, v
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out, "decode_sweep.csv").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    random.seed(0)
    main()
