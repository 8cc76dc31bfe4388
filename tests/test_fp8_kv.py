"""The FP8 (e4m3) KV cache: the format against a from-scratch e4m3, the scales, the reference store and
attention, the Triton kernels against the reference (under Triton's interpreter on a CPU), the engine's
features with an FP8 cache, and its accuracy on the embedded model next to the model-dtype cache."""

from __future__ import annotations

import argparse
import itertools
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the Triton kernels are defined (conftest's helper)

from conftest import interpreted_triton_kernels  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.attention import check_runs_here, resolve_backend_name  # noqa: E402
from nanovllm.attention.flash_attn import FlashAttnBackend  # noqa: E402
from nanovllm.attention.fp8 import (  # noqa: E402
    FP8_DTYPE,
    FP8_MAX,
    SCALE_HEADROOM,
    dequantize_fp8,
    fp8_scale,
    quantize_fp8,
)
from nanovllm.attention.torch_ref import (  # noqa: E402
    causal_attention,
    gather_kv,
    paged_attention_ref,
    paged_decode_ref,
    store_kvcache_ref,
)
from nanovllm.config import EngineConfig, add_engine_args, engine_kwargs  # noqa: E402
from nanovllm.engine.sequence import ScheduledBatch, Sequence  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
CPU = torch.device("cpu")


# -- a from-scratch e4m3 ---------------------------------------------------------------------------------------
def e4m3_value(code: int) -> float:
    """The value of one e4m3fn byte, from its bits: sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal (m/8 * 2**-6); S.1111.111 is NaN (no infinities, so 448 is the largest)."""
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


E4M3_TABLE = torch.tensor([e4m3_value(c) for c in range(128)], dtype=torch.float64)  # the non-negative codes


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value, ties to the even code, saturating at 448: a search over the table."""
    finite = E4M3_TABLE[:127]  # codes 0..126 are 0 .. 448, increasing
    ax = x.double().abs().clamp(max=FP8_MAX)
    hi = torch.searchsorted(finite, ax).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = ax - finite[lo], finite[hi] - ax
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo)
    return torch.where(x < 0, -finite[code], finite[code]).float()


def test_e4m3_from_scratch_matches_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    ours = torch.tensor([e4m3_value(c) for c in range(256)])
    theirs = codes.view(FP8_DTYPE).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])
    assert theirs[~theirs.isnan()].max() == FP8_MAX == 448.0
    # every value, the midpoints between neighbours (ties), and random values of every size
    values = E4M3_TABLE[:127].float()
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, -values, mids, -mids, torch.randn(20000) * 30, torch.randn(2000) * 1e-3,
                   torch.tensor([500.0, -1000.0, 460.0])])
    assert torch.equal(e4m3_round(x), x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float())


def test_quantize_dequantize_round_trip_against_scratch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, generator=gen) * torch.tensor([0.01, 1.0, 40.0])[:, None]  # heads of every size
    scale = fp8_scale(x.abs().amax((0, 2)))
    q = quantize_fp8(x, scale)
    assert q.dtype == FP8_DTYPE
    expected = e4m3_round(x / scale[:, None]) * scale[:, None]
    assert torch.equal(dequantize_fp8(q, scale, torch.float32), expected)
    # the error is e4m3's rounding: at most half a unit in the last place, 1/16 relative for normal values
    big = (x / scale[:, None]).abs() >= 2.0 ** -6
    rel = ((dequantize_fp8(q, scale, torch.float32) - x).abs() / x.abs())[big]
    assert rel.max() <= 2.0 ** -4


def test_scales_are_powers_of_two_with_headroom():
    amax = torch.tensor([1e-3, 0.37, 1.0, 17.0, 300.0, 0.0])
    scale = fp8_scale(amax)
    assert scale.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    live = amax > 0
    stored = amax[live] / scale[live]  # where the calibration's largest value lands
    assert (stored <= FP8_MAX / SCALE_HEADROOM).all() and (stored > FP8_MAX / SCALE_HEADROOM / 2).all()
    assert scale[-1] == 1.0  # a head of zeros


# -- the reference store and attention -----------------------------------------------------------------------
def paged_fp8(num_blocks=6, block_size=4, heads=2, dim=16, seed=0, magnitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks * block_size, heads, dim, generator=gen) * magnitude
    v = torch.randn(num_blocks * block_size, heads, dim, generator=gen) * magnitude
    return k, v


def test_reference_store_writes_quantized_values():
    k, v = paged_fp8()
    k_scale, v_scale = fp8_scale(k.abs().amax((0, 2))), fp8_scale(v.abs().amax((0, 2)))
    k_cache = torch.zeros(6, 4, 2, 16, dtype=FP8_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(24)
    slots[[3, 7]] = -1
    store_kvcache_ref(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    keep = slots >= 0
    got_k = k_cache.view(-1, 2, 16)[slots[keep]]
    assert torch.equal(got_k.view(torch.uint8), quantize_fp8(k[keep], k_scale).view(torch.uint8))
    got_v = dequantize_fp8(v_cache.view(-1, 2, 16)[slots[keep]], v_scale, torch.float32)
    assert torch.equal(got_v, e4m3_round(v[keep] / v_scale[:, None]) * v_scale[:, None])
    # gather_kv reads a sequence back dequantized
    table = torch.tensor([2, 0, 5])
    seq = gather_kv(k_cache, table, 10, k_scale, torch.float32)
    assert torch.equal(seq, dequantize_fp8(k_cache[table].flatten(0, 1)[:10], k_scale, torch.float32))


@pytest.mark.parametrize("magnitude", [1.0, 1000.0])
def test_attention_over_fp8_is_close_and_a_wrong_scale_is_caught(magnitude):
    """Attention over the FP8 cache is close to attention over the exact values; with scale 1 (vLLM's default
    without calibration) values of a thousand are clipped at 448 and the same check fails."""
    k, v = paged_fp8()
    v = v * magnitude  # values of a thousand, keys of one (a moderate softmax)
    q = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(1))
    exact = causal_attention(q, k[:20], v[:20], 16 ** -0.5)
    table = torch.arange(6, dtype=torch.int32)[None]
    cu, ctx = torch.tensor([0, 8], dtype=torch.int32), torch.tensor([20], dtype=torch.int32)

    def attend(k_scale, v_scale):
        k_cache = torch.zeros(6, 4, 2, 16, dtype=FP8_DTYPE)
        v_cache = torch.zeros_like(k_cache)
        store_kvcache_ref(k[:20], v[:20], k_cache, v_cache, torch.arange(20), k_scale, v_scale)
        return paged_attention_ref(q, k_cache, v_cache, cu, ctx, table, 16 ** -0.5, k_scale=k_scale, v_scale=v_scale)

    good = attend(fp8_scale(k.abs().amax((0, 2))), fp8_scale(v.abs().amax((0, 2))))
    tol = 0.1 * magnitude  # e4m3 keeps 3 mantissa bits: a few percent of the values' size
    assert (good - exact).abs().max() < tol
    one = torch.ones(2)
    wrong = (attend(one, one) - exact).abs().max()
    if magnitude > FP8_MAX:
        assert wrong > 3 * tol, wrong  # clipped: the check above would have failed
    # the decode reference reads the same cache the same way
    k_scale, v_scale = fp8_scale(k.abs().amax((0, 2))), fp8_scale(v.abs().amax((0, 2)))
    k_cache = torch.zeros(6, 4, 2, 16, dtype=FP8_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    store_kvcache_ref(k[:20], v[:20], k_cache, v_cache, torch.arange(20), k_scale, v_scale)
    dec = paged_decode_ref(q[-1:], k_cache, v_cache, ctx, table, 16 ** -0.5, k_scale, v_scale)
    torch.testing.assert_close(dec, good[-1:], rtol=1e-5, atol=1e-5 * magnitude)


# -- the Triton kernels against the reference ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tk():
    return interpreted_triton_kernels()


def fp8_paged_cache(ctx_lens, block_size, num_kv_heads, head_dim, seed):
    """A shuffled paged FP8 cache holding random K/V of the sequences, its scales and block tables."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(ctx_lens), max(need) + 1), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    k = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen) * 3
    v = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen) * 0.2
    k_scale, v_scale = fp8_scale(k.abs().amax((0, 2))), fp8_scale(v.abs().amax((0, 2)))
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = quantize_fp8(k, k_scale).view(shape)
    v_cache = quantize_fp8(v, v_scale).view(shape)
    to = dict(device=DEVICE)
    return (k_cache.to(**to), v_cache.to(**to), k_scale.to(**to), v_scale.to(**to), tables.to(**to),
            torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE))


def test_triton_store_is_the_reference_bit_for_bit(tk):
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim, n = 4, 2, 64, 11
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=gen).to(DEVICE) * 5
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(n, kv_heads, dim)  # strided views, as in the model
    v = qkv[:, (heads + kv_heads) * dim:].view(n, kv_heads, dim)
    # values at every e4m3 tie, so that rounding mistakes show
    k[0, 0, :16] = torch.tensor([0.5 * (a + b) for a, b in zip(range(16), range(1, 17))], device=DEVICE)
    k_scale, v_scale = fp8_scale(k.abs().amax((0, 2))), fp8_scale(v.abs().amax((0, 2)) / 8)  # V clips
    # signed zeros: a negative value that rounds to zero is stored as -0 (byte 0x80), as the reference does (Triton
    # releases before a 2026 fix compile a float's unary minus as 0 - x, which would store +0: the likely cause of
    # the difference the H100 check saw)
    k[1, 1, :4] = torch.tensor([-1e-6, -0.0, 1e-6, 0.0], device=DEVICE) * k_scale[1]
    slots = torch.randperm(4 * 16, generator=gen)[:n].to(DEVICE)
    slots[[2, 9]] = -1
    caches = [torch.zeros(4, 16, kv_heads, dim, dtype=FP8_DTYPE, device=DEVICE) for _ in range(4)]
    store_kvcache_ref(k, v, caches[0], caches[1], slots, k_scale, v_scale)
    tk.store_kvcache(k, v, caches[2], caches[3], slots, k_scale, v_scale)
    assert torch.equal(caches[2].view(torch.uint8), caches[0].view(torch.uint8))
    assert torch.equal(caches[3].view(torch.uint8), caches[1].view(torch.uint8))
    assert caches[2].view(-1, kv_heads, dim)[slots[1], 1, :4].view(torch.uint8).tolist() == [0x80, 0x80, 0, 0]


def test_triton_fused_rope_store_fp8(tk):
    from nanovllm.layers.norm import rms_norm
    from nanovllm.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, dim, n = 4, 2, 32, 7
    rope = RotaryEmbedding(dim, 64, 10000.0)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=gen) * 4
    positions = torch.arange(3, 3 + n)
    qw, kw = torch.rand(dim, generator=gen) + 0.5, torch.rand(dim, generator=gen) + 0.5
    q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k = rms_norm(q.reshape(n, heads, dim), qw, 1e-6), rms_norm(k.reshape(n, kv_heads, dim), kw, 1e-6)
    q, k = rope(positions, q, k)
    v = v.reshape(n, kv_heads, dim)
    k_scale, v_scale = fp8_scale(k.abs().amax((0, 2))), fp8_scale(v.abs().amax((0, 2)))
    slots = torch.tensor([5, 0, -1, 9, 30, 31, 2])
    ref = [torch.zeros(2, 16, kv_heads, dim, dtype=FP8_DTYPE) for _ in range(2)]
    store_kvcache_ref(k, v, ref[0], ref[1], slots, k_scale, v_scale)
    got = [torch.zeros(2, 16, kv_heads, dim, dtype=FP8_DTYPE, device=DEVICE) for _ in range(2)]
    tk.qkv_rope_store(qkv.to(DEVICE), positions.to(DEVICE), rope.cos_sin.to(DEVICE), heads, kv_heads, dim,
                      qw.to(DEVICE), kw.to(DEVICE), 1e-6, got[0], got[1], slots.to(DEVICE),
                      k_scale.to(DEVICE), v_scale.to(DEVICE))
    # K after RoPE may differ from the reference in its last float32 bit, so one code apart at most
    diff = (got[0].cpu().view(torch.uint8).int() - ref[0].view(torch.uint8).int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.98
    assert torch.equal(got[1].cpu().view(torch.uint8), ref[1].view(torch.uint8))  # V is stored as it came


def test_decode_reference_keeps_stale_bytes_out():
    """The reference decode reads a padded view of the cache: the rows past each context (the rest of its last
    block, and the padding up to the longest context) hold whatever the cache holds, NaN too (e4m3fn 0x7F); they
    must not reach the output."""
    k_cache, v_cache, k_scale, v_scale, tables, ctx = fp8_paged_cache([5, 40, 17], 16, 2, 64, seed=5)
    q = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    clean = paged_decode_ref(q, k_cache, v_cache, ctx, tables, 0.125, k_scale, v_scale)
    live = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE)  # [num_blocks, block_size]
    for i, n in enumerate(ctx.tolist()):
        for pos in range(n):
            live[tables[i, pos // 16], pos % 16] = True
    stale = [c.clone() for c in (k_cache, v_cache)]
    for c in stale:
        c.view(torch.uint8)[~live] = 0x7F
    out = paged_decode_ref(q, *stale, ctx, tables, 0.125, k_scale, v_scale)
    assert torch.equal(out, clean)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_fp8(tk, num_splits):
    k_cache, v_cache, k_scale, v_scale, tables, ctx = fp8_paged_cache([5, 40, 17], 16, 2, 64, seed=5)
    q = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    out = tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, num_splits=num_splits,
                                    k_scale=k_scale, v_scale=v_scale)
    ref = paged_decode_ref(q, k_cache, v_cache, ctx, tables, 0.125, k_scale, v_scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_fp8_float16_products(tk, num_splits):
    """``f16_dot``: the same attention with the products in float16 (q rounded to it; the weights too)."""
    k_cache, v_cache, k_scale, v_scale, tables, ctx = fp8_paged_cache([5, 40, 17], 16, 2, 64, seed=5)
    q = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    out = tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, num_splits=num_splits,
                                    k_scale=k_scale, v_scale=v_scale, f16_dot=True)
    ref = paged_decode_ref(q, k_cache, v_cache, ctx, tables, 0.125, k_scale, v_scale)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)  # float16: 11 bits of the weights
    exact = tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, num_splits=num_splits,
                                      k_scale=k_scale, v_scale=v_scale)
    assert not torch.equal(out, exact)  # it did take the float16 path
    with pytest.raises(ValueError, match="f16_dot=True is for an FP8 cache"):
        tk.paged_decode_attention(q, k_cache.float(), v_cache.float(), tables, ctx, 0.125, f16_dot=True)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_triton_decode_fp8_read_as_words_equals_reading_bytes(tk, num_splits, head_dim):
    """``fp8_words``: the V tile (and with ``fp8_words_k`` K's) read as 16-bit words and widened by Triton's
    conversion ("convert") or by inline PTX ("asm", in the interpreter "convert"; compiled by
    tests/triton_compile_check.py) give the attention of the byte-reading launch
    (head_dim 80: a tile wider than the head, its masked words); bad values are refused."""
    k_cache, v_cache, k_scale, v_scale, tables, ctx = fp8_paged_cache([5, 40, 17], 16, 2, head_dim, seed=11)
    q = torch.randn(3, 6, head_dim, generator=torch.Generator().manual_seed(12)).to(DEVICE).bfloat16()
    run = dict(num_splits=num_splits, k_scale=k_scale, v_scale=v_scale, f16_dot=True)
    by_bytes = tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, **run)
    ref = paged_decode_ref(q.float(), k_cache, v_cache, ctx, tables, 0.125, k_scale, v_scale)
    for words, k_words in itertools.product(("convert", "asm"), (False, True)):
        got = tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, **run, fp8_words=words,
                                        fp8_words_k=k_words)
        torch.testing.assert_close(got, by_bytes, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)  # a bfloat16 output
    with pytest.raises(ValueError, match="fp8_words_k reads K as words as fp8_words reads V: it needs fp8_words"):
        tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, **run, fp8_words_k=True)
    with pytest.raises(ValueError, match="fp8_words must be None, 'convert' or 'asm'"):
        tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, **run, fp8_words="bytes")
    with pytest.raises(ValueError, match="needs f16_dot=True"):
        tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, k_scale=k_scale, v_scale=v_scale,
                                  fp8_words="asm")


def test_triton_backend_decodes_fp8_with_float16_products_for_bf16_queries(tk):
    """The backend's decode over an FP8 cache takes the float16 products for bfloat16 queries (faster on an H100),
    the q-dtype products for float32 ones, and ``fp8_f16_dot=False`` turns them off."""
    from nanovllm.attention.base import AttentionMetadata

    k_cache, v_cache, k_scale, v_scale, tables, ctx = fp8_paged_cache([5, 40, 17], 16, 2, 64, seed=9)
    meta = AttentionMetadata(is_prefill=False, cu_seqlens_q=torch.arange(4, dtype=torch.int32, device=DEVICE),
                             context_lens=ctx, slot_mapping=torch.zeros(3, dtype=torch.int64, device=DEVICE),
                             block_tables=tables, max_seqlen_q=1, max_seqlen_k=40)
    q32 = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    for q in (q32.bfloat16(), q32):
        def kernel(f16_dot, q=q):
            return tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125, k_scale=k_scale,
                                             v_scale=v_scale, f16_dot=f16_dot)
        on, off = kernel(True), kernel(False)
        assert not torch.equal(on, off)  # the two paths differ on these inputs, so the checks below can fail
        got = tk.TritonBackend().forward(q, None, None, k_cache, v_cache, meta, 0.125, k_scale, v_scale)
        assert torch.equal(got, on if q.dtype == torch.bfloat16 else off)
        got = tk.TritonBackend(fp8_f16_dot=False).forward(q, None, None, k_cache, v_cache, meta, 0.125,
                                                          k_scale, v_scale)
        assert torch.equal(got, off)


def test_triton_backend_reads_the_fp8_v_tile_as_words_widened_by_ptx(tk, monkeypatch):
    """With float16 products the backend reads K and V as words widened by the GPU's instruction ("asm", the
    fastest on an H100; "convert" in the interpreter, the same values); not with float32 queries."""
    from nanovllm.attention.base import AttentionMetadata

    k_cache, v_cache, k_scale, v_scale, tables, ctx = fp8_paged_cache([5, 40, 17], 16, 2, 64, seed=9)
    meta = AttentionMetadata(is_prefill=False, cu_seqlens_q=torch.arange(4, dtype=torch.int32, device=DEVICE),
                             context_lens=ctx, slot_mapping=torch.zeros(3, dtype=torch.int64, device=DEVICE),
                             block_tables=tables, max_seqlen_q=1, max_seqlen_k=40)
    seen = []
    real = tk.paged_decode_attention
    monkeypatch.setattr(tk, "paged_decode_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    q = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    for q_, words in ((q.bfloat16(), "asm"), (q, None)):
        got = tk.TritonBackend().forward(q_, None, None, k_cache, v_cache, meta, 0.125, k_scale, v_scale)
        assert (seen[-1]["fp8_words"], seen[-1]["fp8_words_k"]) == (words, words is not None)
        ref = paged_decode_ref(q_.float(), k_cache, v_cache, ctx, tables, 0.125, k_scale, v_scale)
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_triton_prefill_fp8(tk):
    k_cache, v_cache, k_scale, v_scale, tables, ctx = fp8_paged_cache([20, 37], 16, 2, 32, seed=7)
    q_lens = [20, 9]  # a whole prompt, and a chunk after a cached prefix
    cu = torch.tensor([0, 20, 29], dtype=torch.int32, device=DEVICE)
    q = torch.randn(29, 4, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    out = tk.paged_prefill_attention(q, k_cache, v_cache, cu, ctx, tables, 32 ** -0.5, max(q_lens),
                                     k_scale=k_scale, v_scale=v_scale)
    ref = paged_attention_ref(q, k_cache, v_cache, cu, ctx, tables, 32 ** -0.5, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_triton_kernels_refuse_an_fp8_cache_without_scales(tk):
    k_cache, v_cache, *_, tables, ctx = fp8_paged_cache([5], 16, 2, 32, seed=9)
    with pytest.raises(AssertionError, match="k_scale"):
        tk.paged_decode_attention(torch.zeros(1, 2, 32, device=DEVICE), k_cache, v_cache, tables, ctx, 0.1)


# -- configuration and backends ------------------------------------------------------------------------------
def test_config_values():
    assert EngineConfig().kv_cache_dtype == "auto"
    assert EngineConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    assert EngineConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"
    for bad in ("fp8_e5m2", "int8", "bfloat16", "", None, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            EngineConfig(kv_cache_dtype=bad)


def test_cli_flag():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args(["--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"
    assert engine_kwargs(parser.parse_args([]))["kv_cache_dtype"] == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])


def test_backend_choice():
    assert resolve_backend_name("auto", CPU, torch.float32, "fp8") == "torch"
    assert not FlashAttnBackend.fp8_kv_usable(torch.device("cuda"))
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*flash_attn"):
        check_runs_here("flash_attn", CPU, "fp8")
    check_runs_here("torch", CPU, "fp8")
    from nanovllm.attention.flash_attn4 import FlashAttn4Backend

    for cls in (FlashAttnBackend, FlashAttn4Backend):  # (built without __init__: no flash-attn needed)
        backend = cls.__new__(cls)
        with pytest.raises(ValueError, match=f"{cls.name} backend does not support kv_cache_dtype"):
            backend.forward(None, None, None, None, None, None, 1.0, torch.ones(1), torch.ones(1))
        with pytest.raises(ValueError, match=f"{cls.name} backend does not support kv_cache_dtype"):
            backend.store_kv(None, None, None, None, None, torch.ones(1), torch.ones(1))


def test_llm_refuses_flash_attn_with_fp8(tiny_qwen3):
    path, _ = tiny_qwen3
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(path), attention_backend="flash_attn", kv_cache_dtype="fp8")


# -- the engine on a tiny model ------------------------------------------------------------------------------
def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def tiny_prompts(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


def make_fp8(path, **kw):
    kw.setdefault("num_kvcache_blocks", 64)
    return LLM(str(path), device="cpu", max_model_len=256, kv_cache_dtype="fp8", **kw)


def test_engine_cache_is_one_byte_per_value(tiny_qwen3):
    path, _ = tiny_qwen3
    fp8, auto = make_fp8(path), LLM(str(path), device="cpu", max_model_len=256, num_kvcache_blocks=64)
    assert fp8.runner.kv_cache.dtype == FP8_DTYPE and auto.runner.kv_cache.dtype == torch.float32
    assert fp8.runner.kv_cache.element_size() == 1
    assert fp8.runner.kv_bytes_per_block() * 4 == auto.runner.kv_bytes_per_block()
    assert fp8.runner.kv_cache.nbytes == 64 * fp8.runner.kv_bytes_per_block()
    for layer in fp8.runner.attn_layers:  # calibrated: one power-of-two scale per KV head, for K and V
        assert layer.k_scale.shape == layer.v_scale.shape == (layer.num_kv_heads,)
    # sized from memory, the same budget holds four times the blocks
    from nanovllm.engine.model_runner import kv_cache_blocks

    config = EngineConfig(max_num_seqs=1000)
    budget = 1000 * auto.runner.kv_bytes_per_block()
    assert kv_cache_blocks(budget, fp8.runner.kv_bytes_per_block(), config, 16) == 4000


def test_engine_features_with_fp8(tiny_qwen3):
    """Prefix caching, preemption and chunked prefill read and write the same FP8 cache: they give the tokens
    of a plain run (no caching, enough memory, whole prompts)."""
    path, _ = tiny_qwen3
    [prefix] = tiny_prompts([40], seed=1)
    prompts = [prefix + t for t in tiny_prompts([9, 20, 14, 25], seed=2)]
    plain = [o.token_ids for o in make_fp8(path, enable_prefix_caching=False).generate(prompts, greedy(24),
                                                                                       use_tqdm=False)]
    cached = make_fp8(path)
    first = cached.generate(prompts[:1], greedy(24), use_tqdm=False)
    rest = cached.generate(prompts[1:], greedy(24), use_tqdm=False)
    assert rest[0].num_cached_tokens > 0
    assert [o.token_ids for o in first + rest] == plain
    tight = make_fp8(path, num_kvcache_blocks=12)  # 5 requests need 25 blocks at the end: preemption
    assert [o.token_ids for o in tight.generate(prompts, greedy(24), use_tqdm=False)] == plain
    assert tight.scheduler.num_preemptions > 0
    chunked = make_fp8(path, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert [o.token_ids for o in chunked.generate(prompts, greedy(24), use_tqdm=False)] == plain


def test_overlapped_loop_with_fp8(tiny_qwen3):
    from test_overlap import overlapped

    path, _ = tiny_qwen3
    prompts = tiny_prompts([12, 30, 7], seed=3)
    plain = make_fp8(path).generate(prompts, greedy(20), use_tqdm=False)
    llm = overlapped(make_fp8(path))
    assert [o.token_ids for o in llm.generate(prompts, greedy(20), use_tqdm=False)] == [o.token_ids for o in plain]
    assert llm.overlapped.launches > 0


def test_triton_backend_engine_with_fp8_is_the_torch_one(tiny_qwen3, tk):
    """The whole forward pass with the Triton kernels (fused RoPE + FP8 store, prefill, decode) against the
    reference backend, both over an FP8 cache."""
    path, _ = tiny_qwen3
    prompts = tiny_prompts([21, 6], seed=4)
    ref = make_fp8(path, attention_backend="torch").generate(prompts, greedy(6), use_tqdm=False)
    got = make_fp8(path, attention_backend="triton").generate(prompts, greedy(6), use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


# -- accuracy on the embedded model --------------------------------------------------------------------------
TEXT = ("The printing press was invented in the fifteenth century by Johannes Gutenberg, a goldsmith from Mainz. "
        "He combined movable metal type, an oil-based ink and a wooden press adapted from the ones used to make "
        "wine. Within fifty years presses were running in more than two hundred cities, and books that had cost "
        "a year's wages could be bought for a few days' pay.")
#: stated tolerances, measured on the embedded SmolLM2-135M in float32 (chapter 12 shows the numbers): the last
#: position's logits of a prefill span about 30 and move by 0.9 to 1.2 with an FP8 cache (by 0.26 to 0.43 when
#: the whole model runs in bfloat16 instead of float32)
LOGIT_TOL = 2.0  # max |logit difference| on the last position of a prefill
TEACHER_FORCED_AGREEMENT = 0.9  # share of positions whose argmax is the same over a long greedy text
FIRST_TOKENS_IDENTICAL = 5  # free-running greedy tokens identical from the start, at least


@pytest.fixture(scope="module")
def smollm2_pair():
    kw = dict(dtype="float32", attention_backend="torch", max_num_seqs=2, max_model_len=512, num_kvcache_blocks=96,
              enable_prefix_caching=False)
    return LLM(**kw), LLM(kv_cache_dtype="fp8", **kw)


def prefill_logits(llm, ids):
    seq = Sequence(-1, ids)
    llm.block_manager.allocate(seq)
    try:
        return llm.runner.logits(ScheduledBatch([seq], [len(ids)], is_prefill=True))[0]
    finally:
        llm.block_manager.deallocate(seq)


def test_embedded_model_logits_close(smollm2_pair):
    auto, fp8 = smollm2_pair
    ids = auto.tokenizer(TEXT).input_ids
    a, b = prefill_logits(auto, ids), prefill_logits(fp8, ids)
    diff = (a - b).abs().max().item()
    print(f"max |logit difference| {diff:.3f} (logits span {(a.max() - a.min()).item():.1f})")
    assert diff < LOGIT_TOL, diff
    assert a.argmax() == b.argmax()
    # the same check fails when the scales are wrong: 64 times too small, the large values are clipped
    layers = fp8.runner.attn_layers
    saved = [(layer.k_scale.clone(), layer.v_scale.clone()) for layer in layers]
    try:
        with torch.inference_mode():  # (the scales are inference tensors: the calibration pass made them)
            for layer in layers:
                layer.k_scale /= 64
                layer.v_scale /= 64
        clipped = (a - prefill_logits(fp8, ids)).abs().max().item()
    finally:
        with torch.inference_mode():
            for layer, (k_scale, v_scale) in zip(layers, saved):
                layer.k_scale.copy_(k_scale)
                layer.v_scale.copy_(v_scale)
    assert clipped > 2 * LOGIT_TOL, clipped


def test_embedded_model_greedy_agreement(smollm2_pair):
    auto, fp8 = smollm2_pair
    prompt = auto.tokenizer("The printing press was invented").input_ids
    ref = auto.generate([prompt], greedy(96), use_tqdm=False)[0].token_ids
    got = fp8.generate([prompt], greedy(96), use_tqdm=False)[0].token_ids
    first_diff = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), len(ref))
    # teacher forced: at each position of the reference text, does the FP8 engine pick the same next token?
    full = prompt + ref
    lp = fp8.generate([full], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    picks = [max(d, key=lambda t: d[t].logprob) for d in lp[0].prompt_logprobs[len(prompt):]]
    assert len(picks) == len(ref)  # prompt_logprobs[i]: the distribution of token i given the ones before
    agreement = sum(p == t for p, t in zip(picks, ref)) / len(ref)
    print(f"greedy: the first {first_diff} tokens identical; teacher-forced agreement {agreement:.1%}")
    assert first_diff >= FIRST_TOKENS_IDENTICAL, first_diff
    assert agreement >= TEACHER_FORCED_AGREEMENT, agreement
