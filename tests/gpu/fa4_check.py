"""The flash-attn 4 backend (``attention_backend="flash_attn4"``) on a Hopper/Blackwell GPU, in one go (not
collected by pytest; run by hand on the GPU machine, with flash-attn-4 installed by ``tests/gpu/fa4_wheels.sh``,
whose ``run`` puts the checkout and the install on the path):

    bash tests/gpu/fa4_wheels.sh run python3 tests/gpu/fa4_check.py
    bash tests/gpu/fa4_wheels.sh run python3 tests/gpu/fa4_check.py --only kernels,graphs,engine,decode,bench [--out D]

1. kernels: the backend's three calls (prefill without a prefix, prefill over a paged prefix, decode) against
   ``nanovllm.attention.torch_ref`` on random bf16 inputs of the Qwen3-0.6B shape (16 query heads, 8 KV heads,
   head dim 128), for several block sizes (a page of 128 tokens is loaded by TMA, others by cp.async); the
   max |difference| of each;
2. graphs: a decode call captured in a CUDA graph, then replayed with other lengths, block tables and queries
   (what ``cuda_graph_safe`` claims), and the same for a padded prefill call (what ``prefill_graph_safe``
   claims);
3. engine: greedy tokens of the Qwen3-0.6B shape with random weights in bf16, flash_attn4 (each block size)
   vs triton, with the torch reference vs triton beside them as the noise of bf16; the fraction of equal
   tokens, whole sequences equal, where they first part, and the max |logit difference| of one prefill;
4. decode: one decode call at batch 256 over random contexts, triton vs flash_attn4 (each block size): time per
   call and the KV bytes read per second;
5. bench: the seed benchmark (``python -m nanovllm.bench``'s, 256 requests) with triton, then flash_attn4 (each
   block size), in this process: tok/s of each.

Every section prints PASS or FAIL with its numbers as soon as it ends (the bench also each engine's line), and a
failure never stops the others; the numbers also go, one JSON line per section, to ``--out``/fa4_check.jsonl.
Not timed yet: flash-attn 4 compiles each kernel variant at its first call (a few per section), and the engine
and bench sections start several 0.6B engines, so where a call is limited to 10 minutes run it in three,
``--only kernels,graphs,decode``, ``--only engine``, ``--only bench``, on the same warm machine (its compile
cache is then warm too).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from checklib import FAILS, RESULTS, section  # noqa: E402  (beside this script)

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.attention.base import AttentionMetadata  # noqa: E402
from nanovllm.bench import QWEN3_0_6B_CONFIG  # noqa: E402
from nanovllm.engine.sequence import ScheduledBatch, Sequence  # noqa: E402
from nanovllm.utils import cdiv  # noqa: E402

HEADS, KV_HEADS, DIM = 16, 8, 128  # Qwen3-0.6B
SCALE = DIM ** -0.5
DEVICE = "cuda"


def fa4():
    from nanovllm.attention.flash_attn4 import FlashAttn4Backend

    return FlashAttn4Backend()


# -- random paged inputs ---------------------------------------------------------------------------------------
def paged_case(block_size, q_lens, ctx_lens, g, width=None):
    """A cache of random bf16 K/V (every row finite, as the engine's), each sequence's blocks scattered at random,
    block tables padded with -1 as the engine's; queries for each sequence's last ``q_lens`` tokens."""
    blocks = [cdiv(n, block_size) for n in ctx_lens]
    num_blocks = sum(blocks) + 8
    width = width or max(max(blocks), 1)
    kc, vc = (torch.randn(num_blocks, block_size, KV_HEADS, DIM, device=DEVICE, generator=g, dtype=torch.bfloat16)
              for _ in range(2))
    order = torch.randperm(num_blocks, device=DEVICE, generator=g).to(torch.int32)
    tables = torch.full((len(ctx_lens), width), -1, dtype=torch.int32, device=DEVICE)
    start = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = order[start:start + n]
        start += n
    q = torch.randn(sum(q_lens), HEADS, DIM, device=DEVICE, generator=g, dtype=torch.bfloat16)
    meta = metadata(q_lens, ctx_lens, tables, is_prefill=True)
    return q, kc, vc, meta


def metadata(q_lens, ctx_lens, tables, is_prefill):
    cu_q = torch.zeros(len(q_lens) + 1, dtype=torch.int32, device=DEVICE)
    cu_q[1:] = torch.tensor(q_lens, device=DEVICE).cumsum(0)
    cu_k = torch.zeros(len(ctx_lens) + 1, dtype=torch.int32, device=DEVICE)
    cu_k[1:] = torch.tensor(ctx_lens, device=DEVICE).cumsum(0)
    return AttentionMetadata(
        is_prefill=is_prefill, cu_seqlens_q=cu_q, context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.empty(0, dtype=torch.int64, device=DEVICE), block_tables=tables,
        max_seqlen_q=max(q_lens), max_seqlen_k=max(ctx_lens), has_prefix=q_lens != ctx_lens, cu_seqlens_k=cu_k,
        query_lens_cpu=list(q_lens), context_lens_cpu=list(ctx_lens))


def max_diff(out, ref) -> float:
    assert out.shape == ref.shape and out.dtype == torch.bfloat16, (out.shape, ref.shape, out.dtype)
    assert bool(torch.isfinite(out).all()), "non-finite output"
    return (out.float() - ref).abs().max().item()


# -- 1. kernels ------------------------------------------------------------------------------------------------
def kernels(block_sizes):
    from nanovllm.attention.torch_ref import paged_attention_ref, paged_decode_ref, varlen_causal_attention

    g = torch.Generator(device=DEVICE).manual_seed(0)
    backend, numbers = fa4(), {}
    # prefill without a prefix: the new tokens' own K/V (no cache read)
    lens = [1, 7, 128, 129, 500, 1000]
    q, kc, vc, meta = paged_case(16, lens, lens, g)
    k = torch.randn(sum(lens), KV_HEADS, DIM, device=DEVICE, generator=g, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = backend.forward(q, k, v, kc, vc, meta, SCALE)
    numbers["prefill"] = max_diff(out, varlen_causal_attention(q.float(), k.float(), v.float(), meta.cu_seqlens_q,
                                                               SCALE))
    print(f"  prefill (no prefix): max |diff| {numbers['prefill']:.3g}", flush=True)
    for bs in block_sizes:
        # prefill over a cached prefix (chunks, a lone token, one with no prefix among them)
        q_lens, ctx_lens = [1, 7, 64, 200, 3, 300], [1, 100, 64, 1000, 513, 2048]
        q, kc, vc, meta = paged_case(bs, q_lens, ctx_lens, g)
        out = backend.forward(q, None, None, kc, vc, meta, SCALE)
        ref = paged_attention_ref(q.float(), kc, vc, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, SCALE)
        numbers[f"prefix_bs{bs}"] = max_diff(out, ref)
        # decode: one query per sequence, lengths on and off page boundaries
        ctx_lens = [1, 17, 128, 129, 300, 1000, 2048, 4000]
        q, kc, vc, meta = paged_case(bs, [1] * len(ctx_lens), ctx_lens, g)
        meta.is_prefill = False
        out = backend.forward(q, None, None, kc, vc, meta, SCALE)
        ref = paged_decode_ref(q.float(), kc, vc, meta.context_lens, meta.block_tables, SCALE)
        numbers[f"decode_bs{bs}"] = max_diff(out, ref)
        print(f"  block size {bs}: prefix max |diff| {numbers[f'prefix_bs{bs}']:.3g}, decode "
              f"{numbers[f'decode_bs{bs}']:.3g}", flush=True)
    worst = max(numbers.values())
    assert worst < 3e-2, f"max |diff| {worst:.3g} (bf16 output of O(1) values: expect below 1e-2)"
    return numbers


# -- 2. CUDA graphs --------------------------------------------------------------------------------------------
def captured(step):
    """``step()`` captured in a CUDA graph, after one eager run (so that its kernel compiles outside the capture,
    as the engine's warm-up does); returns the graph's replay."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def call_into(out, backend, q, kc, vc, meta):
    """A step for ``captured``: the backend's call over these static buffers, written into ``out``."""
    return lambda: out.copy_(backend.forward(q, None, None, kc, vc, meta, SCALE))


def graphs(block_sizes):
    """Capture one call with some lengths; replay it with others (the static buffers refilled in place)."""
    from nanovllm.attention.torch_ref import paged_attention_ref, paged_decode_ref

    g = torch.Generator(device=DEVICE).manual_seed(1)
    backend, numbers = fa4(), {}
    for bs in block_sizes:
        width = cdiv(4096, bs)
        # decode, as DecodeGraphs: max_seqlen_k fixed at the longest a sequence may be
        q = torch.zeros(8, HEADS, DIM, device=DEVICE, dtype=torch.bfloat16)
        kc, vc = (torch.randn(8 * width, bs, KV_HEADS, DIM, device=DEVICE, generator=g, dtype=torch.bfloat16)
                  for _ in range(2))
        meta = metadata([1] * 8, [1] * 8, torch.zeros(8, width, dtype=torch.int32, device=DEVICE), False)
        meta.max_seqlen_k = 4096
        out = torch.empty_like(q)
        replay = captured(call_into(out, backend, q, kc, vc, meta))
        worst = 0.0
        for trial in range(3):
            lens = torch.randint(1, 4096, (8,), generator=torch.Generator().manual_seed(trial)).to(torch.int32)
            meta.context_lens.copy_(lens)
            meta.block_tables.copy_(torch.randperm(8 * width, device=DEVICE, generator=g)[:8 * width]
                                    .view(8, width).to(torch.int32))
            q.copy_(torch.randn(q.shape, device=DEVICE, generator=g, dtype=torch.bfloat16))
            replay()
            ref = paged_decode_ref(q.float(), kc, vc, meta.context_lens, meta.block_tables, SCALE)
            worst = max(worst, max_diff(out, ref))
        numbers[f"decode_replay_bs{bs}"] = worst
        print(f"  block size {bs}: decode graph replays, max |diff| {worst:.3g}", flush=True)
    try:  # a padded prefill, as PrefillGraphs would capture it (not enabled for flash_attn4): reported, not asserted
        bs, seqs, tokens = block_sizes[0], 4, 256
        width = cdiv(4096, bs)
        kc, vc = (torch.randn(seqs * width, bs, KV_HEADS, DIM, device=DEVICE, generator=g, dtype=torch.bfloat16)
                  for _ in range(2))
        q = torch.zeros(tokens, HEADS, DIM, device=DEVICE, dtype=torch.bfloat16)
        meta = metadata([0] * seqs, [0] * seqs, torch.zeros(seqs, width, dtype=torch.int32, device=DEVICE), True)
        meta.max_seqlen_q, meta.max_seqlen_k, meta.has_prefix = tokens, 4096, True
        out = torch.empty_like(q)
        replay = captured(call_into(out, backend, q, kc, vc, meta))
        q_lens, ctx_lens = [3, 100, 1, 0], [300, 100, 4000, 0]  # the last one pads (no tokens, no context)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        meta.cu_seqlens_q.copy_(cu)
        meta.context_lens.copy_(torch.tensor(ctx_lens, dtype=torch.int32))
        meta.block_tables.copy_(torch.randperm(seqs * width, device=DEVICE, generator=g).view(seqs, width)
                                .to(torch.int32))
        q.copy_(torch.randn(q.shape, device=DEVICE, generator=g, dtype=torch.bfloat16))
        replay()
        n, real = sum(q_lens), seqs - 1
        ref = paged_attention_ref(q[:n].float(), kc, vc, meta.cu_seqlens_q[:real + 1], meta.context_lens[:real],
                                  meta.block_tables[:real], SCALE, q_lens[:real], ctx_lens[:real])
        numbers["prefill_replay"] = max_diff(out[:n], ref)
    except Exception as e:
        numbers["prefill_replay"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"  padded prefill graph (the engine captures prefill steps): {numbers['prefill_replay']}", flush=True)
    worst = max(v for k, v in numbers.items() if k.startswith("decode"))
    assert worst < 3e-2, f"decode replays: max |diff| {worst:.3g}"
    return numbers


# -- 3. engine tokens -------------------------------------------------------------------------------------------
def prefill_logits(llm, ids):
    seq = Sequence(-1, ids)
    llm.block_manager.allocate(seq)
    try:
        return llm.runner.logits(ScheduledBatch([seq], [len(ids) - seq.num_computed_tokens], is_prefill=True))[0]
    finally:
        llm.block_manager.deallocate(seq)


def run_engine(folder, prompts, params, **kw):
    """Greedy tokens of two rounds (the second hits the prefix cache) and one prefill's logits."""
    llm = LLM(folder, dtype="bfloat16", load_format="dummy", max_num_seqs=64, max_model_len=4096,
              gpu_memory_utilization=0.5, **kw)
    try:
        info = dict(backend=llm.runner.backend.name, block_size=llm.config.kvcache_block_size,
                    decode_graphs=llm.runner.graphs is not None, prefill_graphs=llm.runner.prefill_graphs is not None)
        rounds = [[o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] for _ in range(2)]
        logits = prefill_logits(llm, prompts[-1])
        return info, rounds, logits
    finally:
        llm.shutdown()


def agreement(a, b) -> dict:
    """How far two engines' greedy tokens agree: equal tokens (position by position), whole sequences, where
    sequences first part (the median over those that do)."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    total = sum(len(x) for x, _ in pairs)
    equal = sum(s == t for x, y in pairs for s, t in zip(x, y))
    parts = sorted(next(i for i, (s, t) in enumerate(zip(x, y)) if s != t) for x, y in pairs if x != y)
    return dict(equal_tokens=equal / total, equal_sequences=f"{sum(x == y for x, y in pairs)}/{len(pairs)}",
                first_difference_median=parts[len(parts) // 2] if parts else None)


def engine(block_sizes, prefill_graphs):
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 10000, (300,), generator=g).tolist()
    prompts = []
    for i in range(24):  # mixed lengths, half of them on one 300-token prefix (prefix caching)
        tail = torch.randint(0, 10000, (int(torch.randint(1, 1500, (1,), generator=g)),), generator=g).tolist()
        prompts.append(shared + tail if i % 2 else tail)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    numbers = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(QWEN3_0_6B_CONFIG.read_text())
        _, want, want_logits = run_engine(tmp, prompts, params, attention_backend="triton")
        _, ref, ref_logits = run_engine(tmp, prompts, params, attention_backend="torch")
        numbers["torch_vs_triton"] = agreement(ref, want) | dict(
            logit_max_abs_diff=(ref_logits - want_logits).abs().max().item())
        print(f"  torch vs triton (the noise of bf16): {numbers['torch_vs_triton']}", flush=True)
        from nanovllm.attention.flash_attn4 import FlashAttn4Backend

        default = FlashAttn4Backend.prefill_graph_safe  # the package's: prefill steps captured too
        variants = [(f"flash_attn4_bs{bs}", dict(kvcache_block_size=bs), default) for bs in block_sizes]
        if prefill_graphs:  # the other setting beside it
            variants.append((f"flash_attn4_bs{block_sizes[0]}_prefill_graphs_{'off' if default else 'on'}",
                             dict(kvcache_block_size=block_sizes[0]), not default))
        for name, kw, capture_prefill in variants:
            FlashAttn4Backend.prefill_graph_safe = capture_prefill
            try:
                info, got, logits = run_engine(tmp, prompts, params, attention_backend="flash_attn4", **kw)
            except Exception as e:
                numbers[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"  {name}: {numbers[name]}\n{traceback.format_exc()}", flush=True)
                continue
            finally:
                FlashAttn4Backend.prefill_graph_safe = default
            assert info["backend"] == "flash_attn4" and info["decode_graphs"], info
            assert info["prefill_graphs"] == capture_prefill, info
            numbers[name] = info | agreement(got, want) | dict(
                logit_max_abs_diff_vs_triton=(logits - want_logits).abs().max().item(),
                vs_torch=agreement(got, ref)["equal_tokens"])
            print(f"  {name} vs triton: {numbers[name]}", flush=True)
    failed = [k for k, v in numbers.items() if isinstance(v, str)]
    assert not failed, f"engines failed: {failed}"
    return numbers


# -- 4. one decode call -------------------------------------------------------------------------------------------
def decode_timing(block_sizes, batch=256, iters=50):
    from nanovllm.attention.triton_kernels import TritonBackend

    g = torch.Generator(device=DEVICE).manual_seed(2)
    lens = torch.randint(100, 2048, (batch,), generator=torch.Generator().manual_seed(0)).tolist()
    kv_bytes = 2 * sum(lens) * KV_HEADS * DIM * 2
    numbers = dict(batch=batch, mean_context=sum(lens) / batch)
    for name, backend, bs in [("triton", TritonBackend(), 16)] + [("flash_attn4", fa4(), bs) for bs in block_sizes]:
        q, kc, vc, meta = paged_case(bs, [1] * batch, lens, g)
        meta.is_prefill = False
        for _ in range(3):
            backend.forward(q, None, None, kc, vc, meta, SCALE)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            backend.forward(q, None, None, kc, vc, meta, SCALE)
        end.record()
        end.synchronize()
        us = start.elapsed_time(end) / iters * 1e3
        numbers[f"{name}_bs{bs}_us"] = us
        numbers[f"{name}_bs{bs}_GBps"] = kv_bytes / us / 1e3
        print(f"  {name}, block size {bs}: {us:.1f} us per call, {kv_bytes / us / 1e3:.0f} GB/s of KV", flush=True)
    return numbers


# -- 5. the seed benchmark ------------------------------------------------------------------------------------------
def bench(block_sizes, out):
    from nanovllm import bench as nb

    rates = {}
    for backend, bs in [("triton", 16)] + [("flash_attn4", bs) for bs in block_sizes]:
        key = f"{backend}_bs{bs}"
        argv = ["--engine", "nanovllm", "--attention-backend", backend, "--block-size", str(bs),
                "--json", str(out / "fa4_bench.jsonl")]
        try:
            [r] = nb.main(argv)
            rates[key] = r.tok_per_s
        except SystemExit as e:  # an engine failed: bench printed why; keep the others' numbers
            rates[key] = f"failed ({e.code})"
        print(f"  seed benchmark, {key}: {rates[key]}", flush=True)
    base = rates.get("triton_bs16")
    for key, value in list(rates.items()):
        if key != "triton_bs16" and isinstance(value, float) and isinstance(base, float):
            rates[f"{key}_over_triton"] = value / base
    failed = [k for k, v in rates.items() if isinstance(v, str)]
    assert not failed, f"failed: {failed} ({rates})"
    return {f"tok_per_s_{k}" if not k.endswith("_over_triton") else k: v for k, v in rates.items()}


def package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi", "triton"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/nanovllm-fa4")
    ap.add_argument("--only", default="kernels,graphs,engine,decode,bench",
                    help="comma-separated sections: kernels, graphs, engine, decode, bench")
    ap.add_argument("--block-sizes", default="16,64,128,256",
                    help="block sizes of the kernel checks (any works; 128 = tile_n, the TMA path)")
    ap.add_argument("--engine-block-sizes", default="16,128",
                    help="block sizes of the engine, decode and bench sections")
    ap.add_argument("--no-prefill-graphs", action="store_true",
                    help="engine: skip the run with the other prefill_graph_safe setting")
    args = ap.parse_args()
    only = set(args.only.split(","))
    unknown = only - {"kernels", "graphs", "engine", "decode", "bench"}
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    engine_sizes = [int(b) for b in args.engine_block_sizes.split(",")]
    if not torch.cuda.is_available():
        sys.exit("fa4_check.py needs a CUDA GPU (compute capability 9.x or 10.x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, torch "
          f"{torch.__version__}; {package_versions()}", flush=True)
    t = time.perf_counter()
    try:
        if "kernels" in only:
            section("kernels: flash_attn4 prefill, prefix, decode vs the reference", kernels, block_sizes)
        if "graphs" in only:
            section("graphs: flash_attn4 decode captured, replayed with other inputs", graphs, block_sizes)
        if "engine" in only:
            section("engine: Qwen3-0.6B shape, random weights, bf16 greedy, flash_attn4 vs triton", engine,
                    engine_sizes, not args.no_prefill_graphs)
        if "decode" in only:
            section("decode: one call at batch 256, triton vs flash_attn4", decode_timing, engine_sizes)
        if "bench" in only:
            section("seed benchmark: triton vs flash_attn4", bench, engine_sizes, out)
    finally:
        with open(out / "fa4_check.jsonl", "a") as f:
            for r in RESULTS:
                f.write(json.dumps({**r, "gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d")},
                                   default=str) + "\n")
        print(f"{time.perf_counter() - t:.0f} s; " + ("FAILED: " + ", ".join(FAILS) if FAILS else "ALL PASSED"),
              flush=True)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
