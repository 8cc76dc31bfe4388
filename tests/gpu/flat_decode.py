"""An experiment: FP8 decode attention as one persistent, balanced pass over every tile of the batch ("flat"; not part
of the package; a script for a GPU machine, its kernels also tested on a CPU by tests/test_flat_decode.py in Triton's
interpreter).

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
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from nanovllm.attention.triton_kernels import _e4m3_words_to_f16, num_sms  # noqa: E402
from nanovllm.triton_utils import next_pow2  # noqa: E402

BLOCK_N = 128  # tokens a tile


@triton.jit
def _batch_tiles(ctx_ptr, batch, NUM_KV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Every sequence's tiles (an item's: each of its KV heads has as many), and the batch's tiles up to and
    including each sequence's, every KV head."""
    offs_b = tl.arange(0, BLOCK_B)
    n_all = tl.cdiv(tl.load(ctx_ptr + offs_b, mask=offs_b < batch, other=0), BLOCK_N)
    return offs_b, n_all, tl.cumsum(n_all, 0) * NUM_KV


@triton.jit
def _item_query(q_ptr, seq, kvh, batch, stride_qb, stride_qh, offs_g, offs_d, GROUP: tl.constexpr):
    """The query rows of a (sequence, KV head) item, as float16 (bfloat16 values clamped to its range)."""
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=((offs_g < GROUP) & (seq + 0 * offs_g < batch))[:, None], other=0.0)
    return tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def _tile_blocks(bt_ptr, seq, tile, ctx, batch, stride_btb, offs_n, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 TMA: tl.constexpr):
    """Where a sequence's tile lies in the cache: its block (TMA: a tile is one block), or each of its tokens'
    blocks (0 past the context; the block table's row ends with the sequence's blocks)."""
    bt_row = bt_ptr + seq.to(tl.int64) * stride_btb
    pos = tile * BLOCK_N + offs_n
    if TMA:
        blocks = tl.load(bt_row + tile, mask=(seq < batch) & (tile * BLOCK_N < ctx), other=0)
    else:
        blocks = tl.load(bt_row + pos // BLOCK_SIZE, mask=(pos < ctx) & (seq + 0 * pos < batch), other=0).to(tl.int64)
    return blocks


@triton.jit
def _flat_decode_kernel(
    q_ptr, kw_ptr, vw_ptr, k_desc, v_desc, bt_ptr, ctx_ptr, ks_ptr, vs_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    batch, qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_wb, stride_ws, stride_wh, stride_btb, stride_ob, stride_oh,
    NUM_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_B: tl.constexpr,
    TMA: tl.constexpr, PTX: tl.constexpr,
    Q_CARRIED: tl.constexpr = False,  # q in registers from item to item, read again as an item starts (else: a tile)
    BT_AHEAD: tl.constexpr = False,  # the block table read a tile ahead (so the pipeline's stages all hold K and V)
):
    pid = tl.program_id(0)
    offs_b, n_all, incl = _batch_tiles(ctx_ptr, batch, NUM_KV, BLOCK_N, BLOCK_B)
    total = tl.sum(n_all, 0) * NUM_KV
    per = tl.cdiv(total, tl.num_programs(0))
    t0 = pid * per
    t1 = tl.minimum(t0 + per, total)
    # the item holding tile t0: sequence, KV head, and the tile within the item
    seq = tl.sum((incl <= t0).to(tl.int32), 0)
    before = tl.sum(tl.where(offs_b < seq, n_all, 0), 0) * NUM_KV
    ctx = tl.load(ctx_ptr + seq, mask=seq < batch, other=0)
    n = tl.cdiv(ctx, BLOCK_N)
    rel = t0 - before
    kvh = rel // tl.maximum(n, 1)
    tile = rel % tl.maximum(n, 1)
    first = tile  # the part's first tile in its item: 0 when the part starts the item

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, HEAD_DIM // 2)
    g_mask = offs_g < GROUP
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if Q_CARRIED:
        q = _item_query(q_ptr, seq, kvh, batch, stride_qb, stride_qh, offs_g, offs_d, GROUP)
    if BT_AHEAD:
        blocks = _tile_blocks(bt_ptr, seq, tile, ctx, batch, stride_btb, offs_n, BLOCK_N, BLOCK_SIZE, TMA)
    for j in range(t0, t1):
        heads = kvh * GROUP + offs_g
        if not Q_CARRIED:  # a copy of q a tile, in the software pipeline with the tile's K and V
            q = _item_query(q_ptr, seq, kvh, batch, stride_qb, stride_qh, offs_g, offs_d, GROUP)
        scale = qk_scale * tl.load(ks_ptr + kvh)
        pos = tile * BLOCK_N + offs_n
        n_mask = pos < ctx
        if not BT_AHEAD:
            blocks = _tile_blocks(bt_ptr, seq, tile, ctx, batch, stride_btb, offs_n, BLOCK_N, BLOCK_SIZE, TMA)
        if TMA:  # the tile is the sequence's tile-th cache block
            row = blocks * BLOCK_N
            k = k_desc.load([row, kvh * HEAD_DIM]).to(tl.float16)
        else:
            phys = blocks
            w_off = (phys * stride_wb + (pos % BLOCK_SIZE).to(tl.int64) * stride_ws
                     + kvh.to(tl.int64) * stride_wh)[:, None] + offs_w[None, :]
            k = _e4m3_words_to_f16(tl.load(kw_ptr + w_off, mask=n_mask[:, None], other=0), PTX, BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        qk = tl.where(n_mask[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every tile holds a token of the context
        alpha = tl.exp2(m_i - m_new)  # 0 at an item's first tile (m_i = -inf): acc and l_i start again there
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:  # TMA cannot mask: rows past the context are stale bytes (NaN too), zeroed
            v = tl.where(n_mask[:, None], v_desc.load([row, kvh * HEAD_DIM]).to(tl.float16), 0.0)
        else:
            v = _e4m3_words_to_f16(tl.load(vw_ptr + w_off, mask=n_mask[:, None], other=0), PTX, BLOCK_N, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
        last = (tile == n - 1) | (j == t1 - 1)  # the end of the item, or of this program's tiles
        if last:
            o = acc / l_i[:, None] * tl.load(vs_ptr + kvh)
            if (first == 0) & (tile == n - 1):  # the whole item: the output
                tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
            else:  # a part: its output and log-sum-exp, for the combining kernel (part pid + item: unique)
                part = (pid + seq * NUM_KV + kvh).to(tl.int64) * GROUP + offs_g
                tl.store(mid_lse_ptr + part, m_i + tl.log2(l_i), mask=g_mask)
                tl.store(mid_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None])
        m_i = tl.where(last, float("-inf"), m_i)
        tile += 1
        if tile == n:  # the next item
            tile = 0
            first = 0
            kvh += 1
            if kvh == NUM_KV:  # the next sequence with a context (the search steps over rows of none)
                kvh = 0
                seq = tl.sum((incl <= j + 1).to(tl.int32), 0)
                ctx = tl.load(ctx_ptr + seq, mask=seq < batch, other=0)
                n = tl.cdiv(ctx, BLOCK_N)
            if Q_CARRIED:
                q = _item_query(q_ptr, seq, kvh, batch, stride_qb, stride_qh, offs_g, offs_d, GROUP)
        if BT_AHEAD:  # the next tile's blocks, read a tile ahead of its copies
            blocks = _tile_blocks(bt_ptr, seq, tile, ctx, batch, stride_btb, offs_n, BLOCK_N, BLOCK_SIZE, TMA)


@triton.jit
def _flat_combine_kernel(
    mid_o_ptr, mid_lse_ptr, ctx_ptr, out_ptr, batch, programs, stride_ob, stride_oh,
    NUM_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One (sequence, KV head) item: nothing where one program read all of it, zeros where it has no context, else
    its parts' outputs weighted by their log-sum-exps."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_b, n_all, incl = _batch_tiles(ctx_ptr, batch, NUM_KV, BLOCK_N, BLOCK_B)
    per = tl.cdiv(tl.sum(n_all, 0) * NUM_KV, programs)
    n = tl.cdiv(tl.load(ctx_ptr + seq), BLOCK_N)
    start = tl.sum(tl.where(offs_b < seq, n_all, 0), 0) * NUM_KV + kvh * n
    p_first = start // tl.maximum(per, 1)
    p_last = (start + n - 1) // tl.maximum(per, 1)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    dst = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if n == 0:
        tl.store(dst, tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    elif p_first != p_last:
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for p in range(p_first, p_last + 1):
            part = (p + seq * NUM_KV + kvh).to(tl.int64) * GROUP + offs_g
            lse = tl.load(mid_lse_ptr + part, mask=g_mask, other=0.0)
            o = tl.load(mid_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=g_mask[:, None], other=0.0)
            m_new = tl.maximum(m, lse)
            a = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            den = den * a + w
            acc = acc * a[:, None] + o * w[:, None]
            m = m_new
        tl.store(dst, (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def flat_decode(q, k_cache, v_cache, block_tables, context_lens, scale, k_scale, v_scale, out=None, *,
                tma: bool = False, programs: int | None = None, programs_per_sm: int = 3, num_stages: int = 2,
                num_warps: int = 4, q_carried: bool = False, bt_ahead: bool = False):
    """Decode attention over an FP8 cache [num_blocks, block_size, kv_heads, head_dim] (head_dim a power of two, 16
    or more; ``tma``: blocks of 128 tokens): ``q`` [B, H, D] -> [B, H, D], as ``paged_decode_attention``.
    ``programs`` (default ``programs_per_sm`` x the GPU's SMs): how many programs share the batch's tiles.
    ``q_carried``: q stays in registers through an item's tiles (read again as the next item starts, outside the
    pipeline) rather than copied with every tile.  ``bt_ahead``: each tile's blocks read from the block table one
    tile before its copies are issued, so that every pipeline stage holds K and V tiles (else the pipeliner gives a
    stage to the block table's read: fp8_words_h100.txt section 8)."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if k_cache.dtype != torch.float8_e4m3fn or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the flat kernel reads a contiguous e4m3 cache")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two of 16 or more, got {head_dim}")
    if tma and block_size != BLOCK_N:
        raise ValueError(f"by TMA the flat kernel reads one cache block a tile: it needs blocks of {BLOCK_N} tokens, "
                         f"got {block_size}")
    if q.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("the flat kernel reads q's head dimension and the block table's rows contiguous")
    batch, num_heads, _ = q.shape
    group = num_heads // kv_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if programs is None:
        programs = programs_per_sm * num_sms(q.device)
    parts = programs + batch * kv_heads
    mid_o = torch.empty(parts * group * head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(parts * group, dtype=torch.float32, device=q.device)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc, v_desc = (TensorDescriptor.from_tensor(c.view(num_blocks * block_size, kv_heads * head_dim),
                                                       [BLOCK_N, head_dim]) for c in (k_cache, v_cache))
    else:
        k_desc = v_desc = None
    kw, vw = k_cache.view(torch.uint16), v_cache.view(torch.uint16)
    interpreted = type(_flat_decode_kernel).__name__ == "InterpretedFunction"
    block_b = max(next_pow2(batch), 16)
    common = dict(NUM_KV=kv_heads, GROUP=group, GROUP_PAD=max(next_pow2(group), 16), HEAD_DIM=head_dim,
                  BLOCK_N=BLOCK_N, BLOCK_B=block_b)
    _flat_decode_kernel[(programs,)](
        q, kw, vw, k_desc, v_desc, block_tables, context_lens, k_scale, v_scale, out, mid_o, mid_lse,
        batch, float(scale) * 1.4426950408889634,
        q.stride(0), q.stride(1), *kw.stride()[:3], block_tables.stride(0), out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, TMA=tma, PTX=not interpreted, Q_CARRIED=q_carried, BT_AHEAD=bt_ahead,
        num_stages=num_stages,
        num_warps=num_warps, **common,
    )
    _flat_combine_kernel[(batch, kv_heads)](
        mid_o, mid_lse, context_lens, out, batch, programs, out.stride(0), out.stride(1), num_warps=4, **common,
    )
    return out


def variants(args):
    """(name, block size, the launch over (q, k, v, tables, lens, scale, k_scale, v_scale)) to time."""
    from tma_decode import tma_decode

    from nanovllm.attention import triton_kernels as tk

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
    from decode_sweep import HKV, D, H, scattered_fp8_cache

    from nanovllm.attention import triton_kernels as tk

    ok = True
    for h, hkv, d in ((H, HKV, D), (9, 3, 64)):
        for bs in (16, 128):
            g = torch.Generator(device="cuda").manual_seed(0)
            lens = torch.tensor([1, 5, 127, 0, 128, 129, 300, 511, 600, 33, 2000, 4000], dtype=torch.int32,
                                device="cuda")
            k, v, tables = scattered_fp8_cache(lens.tolist(), bs, hkv, d, g)
            for i, n in enumerate(lens.tolist()):
                if n % bs:
                    for c in (k, v):
                        c.view(torch.uint8)[int(tables[i, (n - 1) // bs]), n % bs:] = 0x7F
            tables = tables.cuda()
            q = torch.randn(len(lens), h, d, device="cuda", dtype=torch.bfloat16, generator=g)
            ks = torch.rand(hkv, device="cuda", generator=g) + 0.5
            vs = torch.rand(hkv, device="cuda", generator=g) + 0.5
            ref = tk.paged_decode_attention(q, k, v, tables, lens, d ** -0.5, k_scale=ks, v_scale=vs, f16_dot=True,
                                            fp8_words="asm", fp8_words_k=True).float()
            for name, block, fn in launches:
                if block != bs:
                    continue
                for programs in (None, 7):
                    kw = {} if programs is None or not name.startswith("flat") else dict(programs=programs)
                    got = (fn(q, k, v, tables, lens, d ** -0.5, ks, vs, **kw) if kw else
                           fn(q, k, v, tables, lens, d ** -0.5, ks, vs)).float()
                    err = (got - ref).abs().max().item()
                    good = err < 2e-2
                    ok &= good
                    print(f"check heads {h}/{hkv} d {d} blocks of {bs}, {name}{', 7 programs' if kw else ''}: "
                          f"max |x - package| = {err:.4g} {'PASS' if good else 'FAIL'}", flush=True)
    return ok


def main():
    from decode_sweep import HKV, D, H, batch_at_step
    from gemm_check import LAYERS, chain, graph_us

    from nanovllm.bench import seed_workload
    from nanovllm.engine.cuda_graphs import graph_batch_sizes

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
        ctx = batch_at_step(w, step)
        bucket = next(b for b in graph_batch_sizes(256) if b >= len(ctx))
        lens = torch.zeros(bucket, dtype=torch.int32, device="cuda")
        lens[:len(ctx)] = torch.tensor(ctx)
        q = torch.randn(bucket, H, D, device="cuda", dtype=torch.bfloat16)
        nbytes = sum(ctx) * HKV * D * 2
        caches = {}
        for bs in (16, 128):  # each layer its own blocks, consecutive per sequence (as the block manager's)
            per = [-(-c // bs) for c in ctx]
            nb = sum(per)
            tables = []
            for layer in range(LAYERS):
                t = torch.zeros(bucket, max(per), dtype=torch.int32)
                first = layer * nb
                for i, n in enumerate(per):
                    t[i, :n] = torch.arange(first, first + n, dtype=torch.int32)
                    first += n
                tables.append(t.cuda())
            k = torch.randn(nb * LAYERS + 8, bs, HKV, D, device="cuda").to(torch.float8_e4m3fn)
            v = torch.randn(nb * LAYERS + 8, bs, HKV, D, device="cuda").to(torch.float8_e4m3fn)
            caches[bs] = (k, v, tables)
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


def in_the_package(tma: bool, programs_per_sm: int = 3, num_stages: int = 2):
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
