"""The Triton attention kernels against the PyTorch reference (nanovllm/attention/torch_ref.py).

Without a GPU the kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set below
before the kernels are defined), in float32 with tight tolerances; shapes are kept small because the
interpreter is slow.  With CUDA the same tests run on the GPU in float32 and bfloat16.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the @triton.jit functions are created

pytest.importorskip("triton")
tk = importlib.import_module("nanovllm.attention.triton_kernels")
if not HAS_CUDA and type(tk._decode_split_kernel).__name__ != "InterpretedFunction":
    tk = importlib.reload(tk)  # imported earlier without the interpreter: define the kernels again

from nanovllm.attention.base import AttentionMetadata  # noqa: E402
from nanovllm.attention.torch_ref import (  # noqa: E402
    TorchRefBackend,
    paged_attention_ref,
    paged_decode_ref,
    store_kvcache_ref,
)

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32]
TOL = {torch.float32: 5e-4 if HAS_CUDA else 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
FILL = 100.0  # value of every cache slot no sequence owns: reading one by mistake shows up at once


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def make_paged_cache(ctx_lens, block_size, num_kv_heads, head_dim, dtype, gen, extra_cols=2, spare_blocks=3):
    """Random K/V caches holding the sequences' tokens in shuffled blocks; -1 padded block tables."""
    need = [math.ceil(c / block_size) for c in ctx_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need) + extra_cols
    block_tables = torch.full((len(ctx_lens), width), -1, dtype=torch.int32)
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    used = 0
    for i, (n, c) in enumerate(zip(need, ctx_lens)):
        blocks = perm[used:used + n]
        used += n
        block_tables[i, :n] = blocks.to(torch.int32)
        pos = torch.arange(c)
        owned[blocks[pos // block_size] * block_size + pos % block_size] = True
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = []
    for _ in range(2):
        cache = torch.randn(*shape, generator=gen)
        cache.view(-1, num_kv_heads, head_dim)[~owned] = FILL
        caches.append(cache.to(device=DEVICE, dtype=dtype))
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    return caches[0], caches[1], block_tables.to(DEVICE), ctx


def assert_close(out, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def reference_dtype(*tensors):
    """The reference runs in float32 on the very values the kernel saw (bf16 inputs upcast)."""
    return [t.float() for t in tensors]


# ---------------------------------------------------------------------------------------------
# store_kvcache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim", [
    (16, 4, 2, 64),
    (32, 9, 3, 128),
    (16, 2, 1, 80),  # head_dim not a power of two
])
def test_store_kvcache(dtype, block_size, num_heads, num_kv_heads, head_dim):
    gen = _gen(1)
    num_tokens, num_blocks = 13, 4
    # k/v are non-contiguous views of a packed qkv projection
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, gen=gen, dtype=dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    assert not k.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 5, 12]] = -1
    slot_mapping = slots.to(device=DEVICE, dtype=torch.int64)

    k_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
    v_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, gen=gen, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache_ref(k, v, k_ref, v_ref, slot_mapping)
    tk.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [
    # block_size, H, Hkv, head_dim, num_splits, context lengths
    (16, 4, 4, 64, 1, [1, 16, 37]),           # group 1, one split
    (16, 4, 2, 128, 4, [1, 16, 17, 130]),      # group 2, several splits, some sequences too short for all
    (32, 6, 2, 64, 3, [32, 5, 200]),           # group 3 (SmolLM2-like), block size 32
    (32, 8, 2, 128, 2, [64, 1, 95, 33, 160]),  # group 4 (Llama-8B-like)
    (16, 6, 2, 80, 2, [50, 17]),               # head_dim 80 (padded to 128)
    (16, 2, 1, 64, 8, [300]),                  # batch 1, long context, many splits (some empty)
    (16, 4, 2, 64, None, [20, 260]),           # heuristic split count
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,num_splits,ctx_lens", DECODE_CASES)
def test_paged_decode(dtype, block_size, num_heads, num_kv_heads, head_dim, num_splits, ctx_lens):
    gen = _gen(2)
    k_cache, v_cache, block_tables, ctx = make_paged_cache(ctx_lens, block_size, num_kv_heads, head_dim,
                                                           dtype, gen)
    batch = len(ctx_lens)
    # q as a non-contiguous view, like the query part of a packed qkv tensor
    q = _randn(batch, num_heads + 2 * num_kv_heads, head_dim, gen=gen, dtype=dtype)[:, :num_heads]
    scale = head_dim ** -0.5
    out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, scale, num_splits=num_splits)
    assert out.shape == (batch, num_heads, head_dim) and out.dtype == dtype
    ref = paged_decode_ref(*reference_dtype(q, k_cache, v_cache), ctx, block_tables, scale)
    assert_close(out, ref, dtype)
    # paged_attention_ref (the per-sequence loop) agrees too
    cu = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    ref2 = paged_attention_ref(*reference_dtype(q, k_cache, v_cache), cu, ctx, block_tables, scale)
    assert_close(out, ref2, dtype)


def test_paged_decode_out_and_max_context_len():
    dtype = torch.float32
    gen = _gen(3)
    ctx_lens = [7, 64, 65]
    k_cache, v_cache, block_tables, ctx = make_paged_cache(ctx_lens, 16, 3, 64, dtype, gen)
    q = _randn(3, 9, 64, gen=gen, dtype=dtype)
    out = torch.full((3, 9, 64), float("nan"), device=DEVICE)
    res = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.125, out=out, max_context_len=65)
    assert res.data_ptr() == out.data_ptr()
    assert_close(out, paged_decode_ref(q, k_cache, v_cache, ctx, block_tables, 0.125), dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_padded_sequence(num_splits):
    """A CUDA-graph padding row (context length 0, block table all -1) yields zeros, not NaN."""
    dtype = torch.float32
    gen = _gen(7)
    k_cache, v_cache, block_tables, _ = make_paged_cache([5, 70], 16, 2, 64, dtype, gen)
    block_tables = torch.cat([block_tables, torch.full_like(block_tables[:1], -1)])
    ctx = torch.tensor([5, 70, 0], dtype=torch.int32, device=DEVICE)
    q = _randn(3, 4, 64, gen=gen, dtype=dtype)
    out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.125, num_splits=num_splits)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    ref = paged_decode_ref(q[:2], k_cache, v_cache, ctx[:2], block_tables[:2], 0.125)
    assert_close(out[:2], ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_paged_decode_tiles_of_128(num_splits):
    """The long tiles big batches launch with on a GPU (block_n=128, two stages), context lengths around
    and past one tile."""
    dtype = DTYPES[-1]
    gen = _gen(13)
    ctx_lens = [1, 127, 128, 129, 300]
    k_cache, v_cache, block_tables, ctx = make_paged_cache(ctx_lens, 16, 2, 64, dtype, gen)
    q = _randn(len(ctx_lens), 4, 64, gen=gen, dtype=dtype)
    out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.125, num_splits=num_splits,
                                    block_n=128, num_stages=2)
    assert_close(out, paged_decode_ref(*reference_dtype(q, k_cache, v_cache), ctx, block_tables, 0.125), dtype)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("heads_first", [False, True])
def test_paged_decode_program_order(num_splits, heads_first):
    """Programs launched sequence-major or KV-head-major compute the same thing; head_dim 80 (a tile wider than
    the head) and GQA groups of 3."""
    dtype = DTYPES[-1]
    gen = _gen(17)
    ctx_lens = [5, 70, 33, 1]
    k_cache, v_cache, block_tables, ctx = make_paged_cache(ctx_lens, 16, 4, 80, dtype, gen)
    q = _randn(len(ctx_lens), 12, 80, gen=gen, dtype=dtype)
    out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.2, num_splits=num_splits,
                                    heads_first=heads_first)
    assert_close(out, paged_decode_ref(*reference_dtype(q, k_cache, v_cache), ctx, block_tables, 0.2), dtype)


def test_decode_launch_settings(monkeypatch):
    cpu = torch.device("cpu")
    big = tk.decode_launch(256, 8, 1, 128, 2, cpu)  # 2048 programs on 132 SMs (as on an H100)
    assert big == dict(block_n=128, num_stages=tk.DECODE_STAGES, heads_first=True)
    assert tk.decode_launch(40, 8, 1, 128, 2, cpu)["block_n"] == 64  # fewer programs: shorter tiles
    split = tk.decode_launch(4, 8, 16, 128, 2, cpu)
    assert split == dict(block_n=64, num_stages=4, heads_first=False)
    assert tk.decode_launch(256, 8, 1, 128, 4, cpu)["block_n"] == 64  # float32 values: shorter tiles
    assert not tk.decode_launch(70000, 8, 1, 128, 2, cpu)["heads_first"]  # past the grid's y limit
    # an FP8 cache: tiles of 128 tokens at any batch, fewer stages
    assert tk.decode_launch(40, 8, 1, 128, 2, cpu, fp8=True) == dict(
        block_n=128, num_stages=tk.FP8_DECODE_STAGES[0], heads_first=True)
    assert tk.decode_launch(4, 8, 16, 128, 2, cpu, fp8=True) == dict(
        block_n=128, num_stages=tk.FP8_DECODE_STAGES[1], heads_first=False)
    # a GPU with ~100 KB of shared memory per program: the K/V tiles of every stage must fit
    monkeypatch.setattr(tk, "max_shared_memory", lambda *a: 99 * 1024)
    for args in [(256, 8, 1, 128, 2), (4, 8, 16, 128, 2), (4, 8, 16, 128, 4), (256, 8, 1, 256, 2)]:
        cfg = tk.decode_launch(*args, cpu)
        per_stage = 2 * cfg["block_n"] * args[3] * args[4]
        assert cfg["num_stages"] >= 1 and (cfg["num_stages"] == 1 or cfg["num_stages"] * per_stage <= 99 * 1024)


def test_pick_num_splits():
    assert tk.pick_num_splits(256, 8, 2000, 132) == 1  # a big batch fills the GPU already
    assert tk.pick_num_splits(1, 8, 32768, 132) == 32  # capped at MAX_SPLITS
    assert tk.pick_num_splits(1, 8, 100, 132) == 1  # short context: splitting doesn't pay
    s = tk.pick_num_splits(4, 8, 4096, 132)
    assert 1 < s <= tk.MAX_SPLITS and 4 * 8 * s >= tk.SPLIT_PROGRAMS_PER_SM * 132
    assert tk.pick_num_splits(48, 8, 4096, 132) == 1  # two programs per SM: no split


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------

PREFILL_CASES = [
    # block_size, H, Hkv, head_dim, query lengths, context lengths, block_m
    (16, 4, 4, 64, [1, 16, 37], [1, 16, 37], 16),          # no prefix, group 1, several q tiles
    (16, 4, 2, 128, [5, 1, 20, 16], [40, 33, 20, 64], None),  # with prefix (and one without), group 2
    (32, 6, 2, 64, [30, 3], [30, 70], None),               # group 3: q tile of 21 tokens, block 32
    (32, 8, 2, 128, [12, 40], [76, 40], 32),               # group 4, prefix, several q tiles
    (16, 6, 2, 80, [9, 24], [25, 24], None),               # head_dim 80
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads,head_dim,q_lens,ctx_lens,block_m", PREFILL_CASES)
def test_paged_prefill(dtype, block_size, num_heads, num_kv_heads, head_dim, q_lens, ctx_lens, block_m):
    gen = _gen(4)
    k_cache, v_cache, block_tables, ctx = make_paged_cache(ctx_lens, block_size, num_kv_heads, head_dim,
                                                           dtype, gen)
    num_tokens = sum(q_lens)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q = _randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, gen=gen, dtype=dtype)[:, :num_heads]
    scale = head_dim ** -0.5
    out = tk.paged_prefill_attention(q, k_cache, v_cache, cu, ctx, block_tables, scale, max(q_lens),
                                     block_m=block_m)
    assert out.shape == (num_tokens, num_heads, head_dim) and out.dtype == dtype
    ref = paged_attention_ref(*reference_dtype(q, k_cache, v_cache), cu, ctx, block_tables, scale)
    assert_close(out, ref, dtype)


# ---------------------------------------------------------------------------------------------
# the backend: store + prefill, then decode steps, against TorchRefBackend
# ---------------------------------------------------------------------------------------------


def _meta(is_prefill, q_lens, ctx_lens, slots, block_tables):
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    return AttentionMetadata(
        is_prefill=is_prefill,
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=block_tables,
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(ctx_lens),
        has_prefix=any(c > q for c, q in zip(ctx_lens, q_lens)),
        query_lens_cpu=list(q_lens),
        context_lens_cpu=list(ctx_lens),
    )


def _slots(block_tables, block_size, seq, positions):
    bt = block_tables[seq].tolist()
    return [bt[p // block_size] * block_size + p % block_size for p in positions]


def test_backend_prefill_then_decode():
    dtype = DTYPES[-1]
    gen = _gen(5)
    block_size, num_heads, num_kv_heads, head_dim = 16, 4, 2, 64
    scale = head_dim ** -0.5
    num_blocks = 12
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = torch.full((2, 6), -1, dtype=torch.int32)
    block_tables[0, :4], block_tables[1, :3] = perm[:4], perm[4:7]
    block_tables = block_tables.to(DEVICE)
    caches = {name: [torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
                     for _ in range(2)] for name in ("triton", "torch")}
    backends = {"triton": tk.TritonBackend(), "torch": TorchRefBackend()}
    assert backends["triton"].name == "triton"

    def step(is_prefill, q_lens, ctx_lens, pad_slots=0):
        positions = [range(c - q, c) for q, c in zip(q_lens, ctx_lens)]
        slots = [s for i, pos in enumerate(positions) for s in _slots(block_tables, block_size, i, pos)]
        slots += [-1] * pad_slots
        meta = _meta(is_prefill, q_lens, ctx_lens, slots, block_tables)
        n = len(slots)
        q = _randn(n, num_heads, head_dim, gen=gen, dtype=dtype)
        k = _randn(n, num_kv_heads, head_dim, gen=gen, dtype=dtype)
        v = _randn(n, num_kv_heads, head_dim, gen=gen, dtype=dtype)
        outs = {}
        for name, backend in backends.items():
            kc, vc = caches[name]
            backend.store_kv(k, v, kc, vc, meta.slot_mapping)
            outs[name] = backend.forward(q[:sum(q_lens)], k, v, kc, vc, meta, scale)
        assert torch.equal(caches["triton"][0], caches["torch"][0])
        assert_close(outs["triton"], outs["torch"], dtype)

    step(True, [40, 20], [40, 20])      # fresh prefill
    step(True, [9, 13], [49, 33])       # chunked prefill over a cached prefix
    step(False, [1, 1], [50, 34])       # decode
    step(False, [1, 1], [51, 35], pad_slots=1)  # decode with a padded (-1) slot in the mapping


def test_backend_without_cache():
    dtype = DTYPES[-1]
    gen = _gen(6)
    q_lens = [3, 5]
    meta = _meta(True, q_lens, q_lens, [-1] * 8, torch.full((2, 1), -1, dtype=torch.int32, device=DEVICE))
    q = _randn(8, 4, 64, gen=gen, dtype=dtype)
    k = _randn(8, 2, 64, gen=gen, dtype=dtype)
    v = _randn(8, 2, 64, gen=gen, dtype=dtype)
    empty = torch.empty(0, device=DEVICE, dtype=dtype)
    out = tk.TritonBackend().forward(q, k, v, empty, empty, meta, 0.125)
    ref = TorchRefBackend().forward(q, k, v, empty, empty, meta, 0.125)
    assert torch.equal(out, ref)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU version is in tests/gpu_kernel_check.py (needs ~9 GB)")
def test_int64_offsets_big_cache():
    """Blocks past 2**31 elements: every slot * stride offset must be computed in int64.  The caches
    are allocated with torch.empty and only the used blocks are touched, so little memory is resident;
    the interpreter reproduces int32 wrap-around (a missing cast crashes or fails here)."""
    dtype = torch.float16
    gen = _gen(8)
    block_size, num_heads, num_kv_heads, head_dim = 16, 2, 1, 128
    num_blocks = 2 ** 31 // (block_size * num_kv_heads * head_dim) + 64
    k_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    ctx_lens = [40, 70]
    block_tables = torch.tensor([[num_blocks - 1 - 2 * j - b for j in range(5)] for b in range(2)], dtype=torch.int32)
    for blk in block_tables.flatten().tolist():
        k_cache[blk] = torch.randn(block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache[blk] = torch.randn(block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.tensor([int(block_tables[b, p // block_size]) * block_size + p % block_size
                          for b, c in enumerate(ctx_lens) for p in range(c - 10, c)])
    k = torch.randn(20, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(20, num_kv_heads, head_dim, generator=gen).to(dtype)
    tk.store_kvcache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[slots], k)
    assert torch.equal(v_cache.view(-1, num_kv_heads, head_dim)[slots], v)

    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    q = torch.randn(2, num_heads, head_dim, generator=gen).to(dtype)
    out = tk.paged_decode_attention(q, k_cache, v_cache, block_tables, ctx, 0.1, num_splits=2)
    ref = paged_decode_ref(q.float(), k_cache, v_cache, ctx, block_tables, 0.1)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    qp = torch.randn(30, num_heads, head_dim, generator=gen).to(dtype)
    out = tk.paged_prefill_attention(qp, k_cache, v_cache, cu, ctx, block_tables, 0.1, 20)
    ref = paged_attention_ref(qp.float(), k_cache, v_cache, cu, ctx, block_tables, 0.1)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# qkv_rope_store: qk-norm + RoPE + KV store in one kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,qk_norm", [
    (4, 2, 64, True),   # Qwen3-style
    (6, 2, 32, False),  # Llama-style: RoPE only
    (3, 3, 80, True),   # D/2 = 40: not a power of two
])
def test_qkv_rope_store_equals_the_three_steps(dtype, num_heads, num_kv_heads, head_dim, qk_norm):
    from nanovllm.layers.norm import rms_norm
    from nanovllm.layers.rotary import RotaryEmbedding, apply_rotary

    gen = _gen(11)
    n, block_size, num_blocks = 7, 4, 6
    qkv = _randn(n, (num_heads + 2 * num_kv_heads) * head_dim, gen=gen, dtype=dtype) * 3
    positions = torch.tensor([0, 5, 9, 1, 33, 2, 100], device=DEVICE)
    slots = torch.tensor([3, 0, -1, 17, 8, 22, 5], device=DEVICE)  # -1: a padding row
    rope = RotaryEmbedding(head_dim, 128, 10000.0).to(DEVICE)
    qw = (1 + 0.1 * _randn(head_dim, gen=gen)).to(dtype) if qk_norm else None
    kw = (1 + 0.1 * _randn(head_dim, gen=gen)).to(dtype) if qk_norm else None

    # the unfused path: split, norm, rotate, store
    q, k, v = qkv.clone().split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    q, k, v = (t.reshape(n, -1, head_dim) for t in (q, k, v))
    if qk_norm:
        q, k = rms_norm(q, qw, 1e-6), rms_norm(k, kw, 1e-6)
    cos, sin = rope.cos_sin[positions].chunk(2, -1)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_ref = torch.full(shape, FILL, dtype=dtype, device=DEVICE)
    v_ref = torch.full_like(k_ref, FILL)
    store_kvcache_ref(k, v, k_ref, v_ref, slots)

    k_cache, v_cache = torch.full_like(k_ref, FILL), torch.full_like(v_ref, FILL)
    fq, fk, fv = tk.qkv_rope_store(qkv, positions, rope.cos_sin, num_heads, num_kv_heads, head_dim, qw, kw, 1e-6,
                                   k_cache, v_cache, slots)
    assert fq.data_ptr() == qkv.data_ptr()  # in place: views of qkv
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fq, q, **tol)
    torch.testing.assert_close(fk, k, **tol)
    assert torch.equal(fv, v)
    torch.testing.assert_close(k_cache, k_ref, **tol)
    assert torch.equal(v_cache, v_ref)  # V is copied, and only into the slots given

    # without a cache it only normalizes and rotates
    again = _randn(n, qkv.shape[1], gen=gen, dtype=dtype)
    gq, gk, _ = tk.qkv_rope_store(again.clone(), positions, rope.cos_sin, num_heads, num_kv_heads, head_dim, qw, kw)
    a_q, a_k, _ = again.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    a_q, a_k = a_q.reshape(n, -1, head_dim), a_k.reshape(n, -1, head_dim)
    if qk_norm:
        a_q, a_k = rms_norm(a_q, qw, 1e-6), rms_norm(a_k, kw, 1e-6)
    torch.testing.assert_close(gq, apply_rotary(a_q, cos, sin), **tol)
    torch.testing.assert_close(gk, apply_rotary(a_k, cos, sin), **tol)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_engine_on_triton_backend_equals_hf(arch, tmp_path):
    """The whole engine on the Triton backend (fused RoPE + KV store, paged prefill over a cached prefix,
    split-KV decode; the interpreter on a CPU) gives HF's greedy tokens in float32."""
    from conftest import hf_greedy, make_tiny_model

    from nanovllm import LLM, SamplingParams

    model = make_tiny_model(arch, tmp_path)
    gen = _gen(12)
    shared = torch.randint(0, 512, (20,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 9)]
    want = [hf_greedy(model, p, 6) for p in prompts]
    llm = LLM(tmp_path, device=DEVICE, dtype=torch.float32, attention_backend="triton", enforce_eager=True,
              kvcache_block_size=8, max_num_batched_tokens=16)  # 16: chunked prefill, the second prompt hits the cache
    assert llm.runner.backend.name == "triton"
    assert all(m.fused_rope_store is tk.qkv_rope_store for m in llm.runner.model.modules()
               if hasattr(m, "fused_rope_store"))
    first = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    both = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert first[0].token_ids == want[0]
    assert [o.token_ids for o in both] == want


def test_launch_fitting_stages_retries_with_fewer_stages():
    """A launch the GPU's shared memory cannot hold is retried with a shallower pipeline, and what fit is
    remembered; a kernel that fits nowhere still raises."""
    from triton.runtime.errors import OutOfResources

    calls = []

    class FakeKernel:
        def __init__(self, fits_up_to):
            self.fits_up_to = fits_up_to

        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                calls.append(num_stages)
                if num_stages > self.fits_up_to:
                    raise OutOfResources(num_stages * 1000, self.fits_up_to * 1000, "shared memory")
            return launch

    key = ("test-kernel", object())
    tk.launch_fitting_stages(FakeKernel(2), (1,), key, 4, "arg", X=1)
    assert calls == [4, 3, 2]
    calls.clear()
    tk.launch_fitting_stages(FakeKernel(2), (1,), key, 4)
    assert calls == [2], "the second launch goes straight to what fit"
    with pytest.raises(OutOfResources):
        tk.launch_fitting_stages(FakeKernel(0), (1,), ("another", object()), 2)
