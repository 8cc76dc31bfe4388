"""Check and time the Triton attention kernels on a GPU (not a pytest module: run it as a script).

    PYTHONPATH=. python3 tests/gpu/kernel_check.py             # every check + timings (a CUDA GPU, ~1-2 min)
    PYTHONPATH=. python3 tests/gpu/kernel_check.py --no-big    # skip the > 2**31-element cache (needs ~20 GB)
    PYTHONPATH=. python3 tests/gpu/kernel_check.py --no-bench  # the checks only, no timings
    PYTHONPATH=. python3 tests/gpu/kernel_check.py --small     # tiny shapes; without a GPU on the Triton interpreter

Compares every kernel with the PyTorch reference (nanovllm/attention/torch_ref.py) in bf16 and fp32 on
Qwen3-0.6B shapes (16 query heads, 8 KV heads, head_dim 128) and a few others, replays decode in a
CUDA graph, and times decode attention (achieved GB/s of K/V read) and prefill (TFLOP/s).
Each check prints PASS or FAIL; a failing or crashing check never stops the others.  Exit status 1
if any check failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: only --small makes sense
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root

RESULTS: list[tuple[str, bool]] = []


def check(name):
    """Decorator: run the check, print PASS/FAIL, never raise."""
    def wrap(fn):
        def run(*args, **kwargs):
            label = name.format(*args, **kwargs) if ("{" in name) else name
            t0 = time.perf_counter()
            try:
                detail = fn(*args, **kwargs)
                ok = True
            except Exception:  # noqa: BLE001 - report and continue
                ok, detail = False, None
                traceback.print_exc()
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            RESULTS.append((label, ok))
            print(f"{'PASS' if ok else 'FAIL'}  {label}  ({time.perf_counter() - t0:.1f}s)"
                  + (f"  {detail}" if detail else ""), flush=True)
            return ok
        return run
    return wrap


def compare(out, ref, dtype, what=""):
    """Raise AssertionError unless out ~ ref for dtype; returns an error summary."""
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the output"
    atol = rtol = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    err = (out - ref).abs()
    bad = err > atol + rtol * ref.abs()
    summary = f"max_abs_err={err.max().item():.2e} max|ref|={ref.abs().max().item():.2e}"
    assert not bad.any(), f"{what}: {int(bad.sum())} elements out of tolerance; {summary}"
    return summary


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


class Paged:
    """A paged K/V cache holding ``ctx_lens`` tokens per sequence in shuffled blocks."""

    def __init__(self, ctx_lens, block_size, num_kv_heads, head_dim, dtype, device, spare_blocks=8,
                 total_blocks=None, high_blocks=False, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        need = [math.ceil(c / block_size) for c in ctx_lens]
        used = sum(need)
        num_blocks = total_blocks or used + spare_blocks
        assert num_blocks >= used
        if high_blocks:  # the sequences own the highest block ids (large offsets)
            ids = num_blocks - used + torch.randperm(used, generator=gen, device=device)
        else:
            ids = torch.randperm(num_blocks, generator=gen, device=device)[:used]
        width = max(need) + 1
        self.block_tables = torch.full((len(ctx_lens), width), -1, dtype=torch.int32, device=device)
        start = 0
        for i, n in enumerate(need):
            self.block_tables[i, :n] = ids[start:start + n].to(torch.int32)
            start += n
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        if high_blocks:  # filling a huge cache is slow and pointless: fill only the owned blocks
            self.k_cache[ids.long()] = torch.randn((used,) + shape[1:], generator=gen, device=device).to(dtype)
            self.v_cache[ids.long()] = torch.randn((used,) + shape[1:], generator=gen, device=device).to(dtype)
        else:
            self.k_cache.normal_(generator=gen)
            self.v_cache.normal_(generator=gen)
        self.ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
        self.ctx_lens = list(ctx_lens)


def randn(*shape, dtype, device, seed=1):
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny shapes (the interpreter without a GPU)")
    ap.add_argument("--no-big", action="store_true", help="skip the > 2**31-element cache check")
    ap.add_argument("--no-bench", action="store_true", help="skip timings")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    small = args.small or not cuda
    if not cuda and not args.small:
        print("no CUDA device: running the --small checks on the Triton interpreter")
    try:
        import triton

        from nanovllm.attention import triton_kernels as tk
        from nanovllm.attention.torch_ref import paged_attention_ref, paged_decode_ref, store_kvcache_ref
    except Exception:
        traceback.print_exc()
        print("FAIL  import nanovllm.attention.triton_kernels")
        return 1
    print(f"torch {torch.__version__}  triton {triton.__version__}  device "
          f"{torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}")

    dtypes = [torch.bfloat16, torch.float32] if cuda else [torch.float32]
    H, HKV, D = 16, 8, 128  # Qwen3-0.6B
    rng = torch.Generator().manual_seed(0)

    def lens(n, lo, hi):
        return torch.randint(lo, hi + 1, (n,), generator=rng).tolist()

    # ---- store_kvcache -------------------------------------------------------------------------
    @check("store_kvcache {0} N={1} Hkv={2} D={3} block={4}")
    def check_store(dtype, n, hkv, d, block_size):
        num_blocks = max(n // block_size * 2, 4)
        qkv = randn(n, (H + 2 * hkv) * d, dtype=dtype, device=device)
        k = qkv[:, H * d:(H + hkv) * d].view(n, hkv, d)
        v = qkv[:, (H + hkv) * d:].view(n, hkv, d)
        slots = torch.randperm(num_blocks * block_size, device=device)[:n]
        slots[::7] = -1
        kc = torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
        vc = torch.zeros_like(kc)
        kr, vr = kc.clone(), vc.clone()
        tk.store_kvcache(k, v, kc, vc, slots)
        store_kvcache_ref(k, v, kr, vr, slots)
        assert torch.equal(kc, kr) and torch.equal(vc, vr), "cache differs from the reference"

    # ---- decode --------------------------------------------------------------------------------
    @check("decode {0} B={1} H={2} Hkv={3} D={4} block={5} ctx={6}..{7} splits={8}")
    def check_decode(dtype, batch, h, hkv, d, block_size, lo, hi, splits):
        ctx_lens = lens(batch, lo, hi)
        ctx_lens[0] = hi
        pg = Paged(ctx_lens, block_size, hkv, d, dtype, device)
        q = randn(batch, h + 2 * hkv, d, dtype=dtype, device=device)[:, :h]  # non-contiguous like qkv
        scale = d ** -0.5
        out = tk.paged_decode_attention(q, pg.k_cache, pg.v_cache, pg.block_tables, pg.ctx, scale,
                                        num_splits=splits, max_context_len=hi)
        ref = paged_decode_ref(q.float(), pg.k_cache.float(), pg.v_cache.float(), pg.ctx, pg.block_tables, scale)
        return compare(out, ref, dtype, "decode")

    # ---- prefill -------------------------------------------------------------------------------
    @check("prefill {0} H={1} Hkv={2} D={3} block={4} q_lens={5} ctx={6}")
    def check_prefill(dtype, h, hkv, d, block_size, q_lens, ctx_lens):
        pg = Paged(ctx_lens, block_size, hkv, d, dtype, device)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        q = randn(sum(q_lens), h + 2 * hkv, d, dtype=dtype, device=device)[:, :h]
        scale = d ** -0.5
        out = tk.paged_prefill_attention(q, pg.k_cache, pg.v_cache, cu, pg.ctx, pg.block_tables, scale,
                                         max(q_lens))
        ref = paged_attention_ref(q.float(), pg.k_cache.float(), pg.v_cache.float(), cu, pg.ctx,
                                  pg.block_tables, scale)
        return compare(out, ref, dtype, "prefill")

    # ---- the skinny GEMM of decode (layers/triton_gemm.py) ---------------------------------------
    @check("skinny gemm {0} M={1} N={2} K={3} act={4}")
    def check_gemm(dtype, m, n, k, act):
        from nanovllm.layers.triton_gemm import skinny_gemm

        x = randn(m, k, dtype=dtype, device=device)
        w = randn(n, k, dtype=dtype, device=device, seed=2) * k ** -0.5
        ref = x.float() @ w.float().T
        if act == "silu_mul":
            gate, up = ref.to(dtype).float().chunk(2, -1)  # rounded as the GEMM stores them
            ref = torch.nn.functional.silu(gate) * up
        return compare(skinny_gemm(x, w, act), ref, dtype, "gemm")

    # ---- a cache of more than 2**31 elements (int64 offsets) ------------------------------------
    @check("big cache (> 2**31 elements, bf16): store + decode + prefill at the highest blocks")
    def check_big_cache():
        dtype, block_size = torch.bfloat16, 16
        total_blocks = (2 ** 31) // (block_size * HKV * D) + 4096  # ~4.4 GB per cache
        ctx_lens = [1000, 1500, 700]
        pg = Paged(ctx_lens, block_size, HKV, D, dtype, device, total_blocks=total_blocks, high_blocks=True)
        assert pg.k_cache.numel() > 2 ** 31
        assert int(pg.block_tables.max()) * block_size * HKV * D > 2 ** 31
        scale = D ** -0.5
        # store: the last 100 tokens of every sequence, written again with fresh values
        slots = []
        for i, c in enumerate(ctx_lens):
            bt = pg.block_tables[i].tolist()
            slots += [bt[p // block_size] * block_size + p % block_size for p in range(c - 100, c)]
        slots = torch.tensor(slots, dtype=torch.int64, device=device)
        k_new = randn(len(slots), HKV, D, dtype=dtype, device=device, seed=3)
        v_new = randn(len(slots), HKV, D, dtype=dtype, device=device, seed=4)
        tk.store_kvcache(k_new, v_new, pg.k_cache, pg.v_cache, slots)
        flat_k = pg.k_cache.view(-1, HKV, D)
        assert torch.equal(flat_k[slots], k_new) and torch.equal(pg.v_cache.view(-1, HKV, D)[slots], v_new)
        q = randn(len(ctx_lens), H, D, dtype=dtype, device=device)
        out = tk.paged_decode_attention(q, pg.k_cache, pg.v_cache, pg.block_tables, pg.ctx, scale, num_splits=3)
        ref = paged_decode_ref(q.float(), pg.k_cache, pg.v_cache, pg.ctx, pg.block_tables, scale)
        s1 = compare(out, ref, dtype, "decode")
        q_lens = [100, 100, 100]
        cu = torch.tensor([0, 100, 200, 300], dtype=torch.int32, device=device)
        qp = randn(300, H, D, dtype=dtype, device=device)
        out = tk.paged_prefill_attention(qp, pg.k_cache, pg.v_cache, cu, pg.ctx, pg.block_tables, scale, 100)
        ref = paged_attention_ref(qp.float(), pg.k_cache, pg.v_cache, cu, pg.ctx, pg.block_tables, scale,
                                  q_lens, ctx_lens)
        s2 = compare(out, ref, dtype, "prefill")
        return f"decode {s1}; prefill {s2}"

    # ---- CUDA graph ----------------------------------------------------------------------------
    @check("decode in a CUDA graph: capture once, replay with other context lengths (bf16)")
    def check_cuda_graph():
        dtype, batch, block_size, max_len = torch.bfloat16, 8, 16, 4096
        width = max_len // block_size
        num_blocks = batch * width + 8
        pg = Paged([max_len] * batch, block_size, HKV, D, dtype, device, total_blocks=num_blocks)
        bt = pg.block_tables[:, :width].contiguous()  # static buffers, as an engine would keep them
        ctx = torch.ones(batch, dtype=torch.int32, device=device)
        q = torch.zeros(batch, H, D, dtype=dtype, device=device)
        out = torch.empty(batch, H, D, dtype=dtype, device=device)
        scale = D ** -0.5

        def step():
            tk.paged_decode_attention(q, pg.k_cache, pg.v_cache, bt, ctx, scale, out=out)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        summaries = []
        for trial, (lo, hi) in enumerate([(1, 64), (100, 2000), (3000, 4096)]):
            ctx.copy_(torch.tensor(lens(batch, lo, hi), dtype=torch.int32))
            q.copy_(randn(batch, H, D, dtype=dtype, device=device, seed=10 + trial))
            graph.replay()
            torch.cuda.synchronize()
            ref = paged_decode_ref(q.float(), pg.k_cache.float(), pg.v_cache.float(), ctx, bt, scale)
            summaries.append(compare(out, ref, dtype, f"replay {trial}"))
        return "; ".join(summaries)

    # ---- run the checks ------------------------------------------------------------------------
    if small:
        for dtype in dtypes:
            check_store(dtype, 37, 2, 64, 16)
            check_decode(dtype, 4, 4, 2, 64, 16, 1, 200, None)
            check_decode(dtype, 3, 6, 2, 128, 32, 1, 100, 3)
            check_prefill(dtype, 4, 2, 64, 16, [30, 1, 17], [30, 50, 17])
            check_gemm(dtype, 5, 48, 64, "silu_mul")
    else:
        for dtype in dtypes:
            check_store(dtype, 4096, HKV, D, 16)
            check_store(dtype, 1000, 3, 64, 32)
            for splits in (None, 1, 4):
                check_decode(dtype, 256, H, HKV, D, 16, 100, 2000, splits)
            check_decode(dtype, 4, H, HKV, D, 16, 10000, 32768, None)
            check_decode(dtype, 1, H, HKV, D, 16, 1, 1, None)
            check_decode(dtype, 64, H, HKV, D, 32, 1, 3000, 2)
            check_decode(dtype, 64, H, HKV, D, 256, 1, 3000, None)
            check_decode(dtype, 32, 9, 3, 64, 16, 1, 2000, None)     # SmolLM2-like: group 3, head_dim 64
            check_decode(dtype, 32, 32, 8, 128, 16, 1, 2000, None)   # Llama-8B-like: group 4
            check_prefill(dtype, H, HKV, D, 16, [1000, 1500, 700, 1], [1000, 1500, 700, 1])
            check_prefill(dtype, H, HKV, D, 16, [1000, 512, 300, 1], [2000, 1024, 3000, 1500])
            check_prefill(dtype, H, HKV, D, 256, [1000, 512], [1000, 4096])
            check_prefill(dtype, 9, 3, 64, 16, [1000, 333], [1000, 1400])
            check_prefill(dtype, 32, 8, 128, 32, [700, 1024], [700, 2048])
            for m in (1, 16, 37, 64, 100, 128, 256):  # every row of the tile table
                check_gemm(dtype, m, 6144, 1024, "silu_mul")
            check_gemm(dtype, 33, 1024, 3072, None)
        check_cuda_graph()
        if not args.no_big:
            check_big_cache()

    # ---- timings -------------------------------------------------------------------------------
    if cuda and not args.no_bench:
        bench_decode(tk, device)
        bench_prefill(tk, device)

    failed = [name for name, ok in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    for name in failed:
        print(f"  FAILED: {name}")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------
# timings
# ------------------------------------------------------------------------------------------------


def bench_decode(tk, device):
    print("\ndecode timings (Qwen3-0.6B heads, bf16, block 16; GB/s = K+V bytes read / time).\n"
          "'graph': replayed from a CUDA graph, as the engine runs decode; 'eager' includes Python launch gaps")
    print(f"{'batch':>6} {'ctx':>11} {'splits':>7} {'graph us':>9} {'GB/s':>7} {'eager us':>9} {'GB/s':>7}"
          f"   {'torch ref us':>12}")
    rng = torch.Generator().manual_seed(1)
    configs = [(1, 1024, 1024), (1, 16384, 16384), (8, 2000, 2000), (32, 100, 2000), (64, 100, 2000),
               (256, 100, 2000), (256, 2000, 2000), (512, 500, 1000)]
    for batch, lo, hi in configs:
        try:
            ctx_lens = torch.randint(lo, hi + 1, (batch,), generator=rng).tolist()
            _bench_decode_one(tk, device, batch, lo, hi, ctx_lens)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print(f"FAIL  decode timing batch={batch} ctx={lo}-{hi}")
        torch.cuda.empty_cache()
    print("(* = the heuristic's split count)")


def _bench_decode_one(tk, device, batch, lo, hi, ctx_lens):
    from triton.testing import do_bench, do_bench_cudagraph

    from nanovllm.attention.torch_ref import paged_decode_ref

    H, HKV, D = 16, 8, 128
    dtype = torch.bfloat16
    pg = Paged(ctx_lens, 16, HKV, D, dtype, device)
    q = randn(batch, H, D, dtype=dtype, device=device)
    out = torch.empty_like(q)
    kv_bytes = 2 * sum(ctx_lens) * HKV * D * pg.k_cache.element_size()
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    heuristic = tk.pick_num_splits(batch, HKV, hi, num_sms)
    ref_us = None
    if batch * hi <= 256 * 2000:
        ref_us = do_bench(lambda: paged_decode_ref(q, pg.k_cache, pg.v_cache, pg.ctx, pg.block_tables, 0.088)) * 1e3
    for splits in sorted({1, heuristic, 2 * heuristic}):
        def fn(splits=splits):
            tk.paged_decode_attention(q, pg.k_cache, pg.v_cache, pg.block_tables, pg.ctx, 0.088,
                                      num_splits=splits, out=out)
        fn()
        ms = do_bench(fn)
        try:
            g_ms = do_bench_cudagraph(fn)
            graph_cols = f"{g_ms * 1e3:9.1f} {kv_bytes / g_ms / 1e6:7.0f}"
        except Exception as exc:  # noqa: BLE001
            graph_cols = f"{'n/a':>9} {'':>7}"
            print(f"  (CUDA-graph timing failed: {exc!r})")
        tag = f"{splits}{'*' if splits == heuristic else ''}"
        ref_col = f"{ref_us:12.1f}" if ref_us is not None and splits == 1 else ""
        print(f"{batch:>6} {f'{lo}-{hi}':>11} {tag:>7} {graph_cols} {ms * 1e3:9.1f} "
              f"{kv_bytes / ms / 1e6:7.0f}   {ref_col}", flush=True)


def bench_prefill(tk, device):
    print("\nprefill timings (Qwen3-0.6B heads, bf16, block 16)")
    for q_lens, ctx_lens in [([1000] * 4, [1000] * 4), ([1000] * 4, [3000] * 4), ([4096] * 2, [4096] * 2),
                             ([512] * 16, [512] * 16)]:
        try:
            _bench_prefill_one(tk, device, q_lens, ctx_lens)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print(f"FAIL  prefill timing q_lens={q_lens[0]}x{len(q_lens)}")
        torch.cuda.empty_cache()


def _bench_prefill_one(tk, device, q_lens, ctx_lens):
    from triton.testing import do_bench

    H, HKV, D = 16, 8, 128
    dtype = torch.bfloat16
    pg = Paged(ctx_lens, 16, HKV, D, dtype, device)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = randn(sum(q_lens), H, D, dtype=dtype, device=device)
    ms = do_bench(lambda: tk.paged_prefill_attention(q, pg.k_cache, pg.v_cache, cu, pg.ctx, pg.block_tables,
                                                     0.088, max(q_lens)))
    keys = sum(sum(c - ql + j + 1 for j in range(ql)) for ql, c in zip(q_lens, ctx_lens))
    flops = 4 * keys * H * D
    print(f"  q_lens={q_lens[0]}x{len(q_lens)} ctx={ctx_lens[0]}: {ms * 1e3:9.1f} us  "
          f"{flops / ms / 1e9:7.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
