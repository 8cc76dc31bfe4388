"""The FP8 KV cache on a CUDA GPU, in one go (not collected by pytest; run by hand on a GPU machine):

    PYTHONPATH=. python3 tests/gpu/fp8_check.py                 # checks + the seed benchmark, auto vs fp8
    PYTHONPATH=. python3 tests/gpu/fp8_check.py --cap-gib 8     # the same sized for an 8 GiB card
    PYTHONPATH=. python3 tests/gpu/fp8_check.py --only kernels,embedded,qwen3,bench [--out DIR]
    PYTHONPATH=. python3 tests/gpu/fp8_check.py --only bench --words bytes,convert,asm+K,asm@w4   # decode reads

1. kernels: the Triton store (and the fused RoPE + store) writes the reference's e4m3 bytes bit for bit in
   bfloat16; decode (one split and several; with float16 products, the tiles read as bytes or as words, either
   conversion) and prefill over an FP8 cache match the reference;
2. embedded: SmolLM2-135M-Instruct (real weights, bf16), kv_cache_dtype "auto" vs "fp8": the max |logit
   difference| of a prefill, the first greedy token where they part, and the teacher-forced top-1 agreement
   over a long greedy generation (does fp8 pick auto's next token at every position of auto's text); two
   engines at once, small ones (the cap applies to the benchmark only);
3. qwen3: the same on the Qwen3-0.6B shape with random weights (a 1,000-token random prompt);
4. bench: the seed benchmark (``python -m nanovllm.bench``'s, 256 requests) with kv_cache_dtype auto, then fp8,
   in this process, tok/s of each and the ratio.  ``--cap-gib 8`` sets gpu_memory_utilization to 8 GiB of
   this card (the CUDA context, weights and activations included), so the cache is what an 8 GiB card holds.

Every section prints PASS or FAIL with its numbers as soon as it ends, and a failure never stops the others;
the numbers also go, one JSON line per section, to ``--out``/fp8_check.jsonl.  About 3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from checklib import FAILS, RESULTS, section  # noqa: E402  (beside this script)

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.attention.fp8 import FP8_DTYPE, fp8_scale, quantize_fp8  # noqa: E402
from nanovllm.bench import QWEN3_0_6B_CONFIG  # noqa: E402
from nanovllm.engine.sequence import ScheduledBatch, Sequence  # noqa: E402

TEXT = ("The printing press was invented in the fifteenth century by Johannes Gutenberg, a goldsmith from Mainz. "
        "He combined movable metal type, an oil-based ink and a wooden press adapted from the ones used to make "
        "wine. Within fifty years presses were running in more than two hundred cities, and books that had cost "
        "a year's wages could be bought for a few days' pay.")


# -- 1. kernels ------------------------------------------------------------------------------------------------
def kernels():
    from nanovllm.attention import triton_kernels as tk
    from nanovllm.attention.torch_ref import paged_attention_ref, paged_decode_ref, store_kvcache_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads, dim, n, bs = 16, 8, 128, 300, 16
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, device="cuda", generator=g, dtype=torch.bfloat16) * 4
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(n, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].view(n, kv_heads, dim)
    k_scale, v_scale = fp8_scale(k.abs().amax((0, 2))), fp8_scale(v.abs().amax((0, 2)) / 4)  # V clips a little
    num_blocks = 40
    slots = torch.randperm(num_blocks * bs, device="cuda", generator=g)[:n]
    slots[::7] = -1
    caches = [torch.zeros(num_blocks, bs, kv_heads, dim, dtype=FP8_DTYPE, device="cuda") for _ in range(4)]
    store_kvcache_ref(k, v, caches[0], caches[1], slots, k_scale, v_scale)
    tk.store_kvcache(k, v, caches[2], caches[3], slots, k_scale, v_scale)
    torch.cuda.synchronize()
    store_same = bool(torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
                      and torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8)))
    assert store_same, "the Triton FP8 store differs from the reference"
    # attention over a full FP8 cache
    x = torch.randn(num_blocks * bs, kv_heads, dim, device="cuda", generator=g) * 3
    y = torch.randn(num_blocks * bs, kv_heads, dim, device="cuda", generator=g) * 0.3
    ks, vs = fp8_scale(x.abs().amax((0, 2))), fp8_scale(y.abs().amax((0, 2)))
    kc = quantize_fp8(x, ks).view(num_blocks, bs, kv_heads, dim)
    vc = quantize_fp8(y, vs).view(num_blocks, bs, kv_heads, dim)
    ctx = torch.tensor([1, 77, 300, 640], dtype=torch.int32, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32).repeat(4, 1)
    q = torch.randn(4, heads, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    ref = paged_decode_ref(q.float(), kc, vc, ctx, tables, dim ** -0.5, ks, vs)
    worst = 0.0
    for splits in (1, 4):
        out = tk.paged_decode_attention(q, kc, vc, tables, ctx, dim ** -0.5, num_splits=splits, k_scale=ks, v_scale=vs)
        worst = max(worst, (out.float() - ref).abs().max().item())
    # float16 products, the tiles read as bytes or as words (widened two ways; K too): every launch vs the reference
    worst_f16 = {}
    for words, k_words in ((None, False), ("convert", False), ("asm", False), ("convert", True), ("asm", True)):
        name = f"{words}{'+K' if k_words else ''}"
        for splits in (1, 4):
            out = tk.paged_decode_attention(q, kc, vc, tables, ctx, dim ** -0.5, num_splits=splits, k_scale=ks,
                                            v_scale=vs, f16_dot=True, fp8_words=words, fp8_words_k=k_words)
            worst_f16[name] = max(worst_f16.get(name, 0.0), (out.float() - ref).abs().max().item())
    print("  decode, float16 products, max |diff| from the reference: "
          + ", ".join(f"{n} {d:.4f}" for n, d in worst_f16.items()), flush=True)
    qp = torch.randn(int(ctx.sum()), heads, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    cu = torch.zeros(5, dtype=torch.int32, device="cuda")
    cu[1:] = ctx.cumsum(0)
    out = tk.paged_prefill_attention(qp, kc, vc, cu, ctx, tables, dim ** -0.5, int(ctx.max()), k_scale=ks, v_scale=vs)
    refp = paged_attention_ref(qp.float(), kc, vc, cu, ctx, tables, dim ** -0.5, k_scale=ks, v_scale=vs)
    worst_prefill = (out.float() - refp).abs().max().item()
    assert worst < 3e-2 and worst_prefill < 3e-2 and max(worst_f16.values()) < 3e-2, (worst, worst_prefill, worst_f16)
    return dict(store_bit_exact=store_same, decode_max_diff=worst, prefill_max_diff=worst_prefill,
                decode_f16_max_diff=worst_f16)


# -- 2./3. accuracy ----------------------------------------------------------------------------------------------
def prefill_logits(llm, ids):
    seq = Sequence(-1, ids)
    llm.block_manager.allocate(seq)
    try:
        return llm.runner.logits(ScheduledBatch([seq], [len(ids) - seq.num_computed_tokens], is_prefill=True))[0]
    finally:
        llm.block_manager.deallocate(seq)


def compare(model, engine_args, prompt_ids, text_ids, new_tokens):
    """auto vs fp8 on one model: prefill logits, free-running greedy, teacher-forced top-1 agreement."""
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(model, kv_cache_dtype=kv, enable_prefix_caching=False, **engine_args)
        try:
            logits = prefill_logits(llm, text_ids)
            greedy = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
                                  use_tqdm=False)[0].token_ids
            runs[kv] = dict(logits=logits, greedy=greedy, llm=llm, backend=llm.runner.backend.name)
        except Exception:
            llm.shutdown()
            raise
    try:
        ref = runs["auto"]["greedy"]
        full = prompt_ids + ref
        lp = runs["fp8"]["llm"].generate([full], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                                         use_tqdm=False)[0].prompt_logprobs[len(prompt_ids):]
        picks = [max(d, key=lambda t: d[t].logprob) for d in lp]
        a, b = runs["auto"]["logits"], runs["fp8"]["logits"]
        got = runs["fp8"]["greedy"]
        return dict(backend=runs["fp8"]["backend"], logit_max_abs_diff=(a - b).abs().max().item(),
                    logit_range=(a.max() - a.min()).item(), same_argmax=bool(a.argmax() == b.argmax()),
                    first_greedy_difference=next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), len(ref)),
                    greedy_tokens=len(ref),
                    teacher_forced_agreement=sum(p == t for p, t in zip(picks, ref)) / len(ref))
    finally:
        for r in runs.values():
            r["llm"].shutdown()


def embedded():
    from nanovllm.loading.embedded import embedded_model_dir
    from nanovllm.loading.resolve import load_tokenizer

    folder = embedded_model_dir()
    tok = load_tokenizer(folder)
    args = dict(dtype="bfloat16", max_num_seqs=8, max_model_len=2048)
    return compare(folder, args, tok("The printing press was invented").input_ids, tok(TEXT).input_ids, 512)


def qwen3():
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(QWEN3_0_6B_CONFIG.read_text())
        g = torch.Generator().manual_seed(0)
        vocab = json.loads(QWEN3_0_6B_CONFIG.read_text())["vocab_size"]
        prompt = torch.randint(0, 10000, (1000,), generator=g).tolist()
        args = dict(dtype="bfloat16", load_format="dummy", max_num_seqs=8, max_model_len=4096)
        assert vocab > 10000
        return compare(tmp, args, prompt[:200], prompt, 512)


def pdl_same():
    """Programmatic dependent launch changes when a kernel starts, never what it computes: the Qwen3-0.6B shape
    (random weights, an FP8 cache, split-K and the Triton qkv GEMM on, so every kernel of a layer is Triton's) gives
    the same greedy tokens and the same logprobs, bit for bit, with ``nanovllm.triton_pdl.PDL`` off and on, at
    batch sizes from 1 to 48 (CUDA graphs and eager prefill both)."""
    from nanovllm import kernels as nk
    from nanovllm import triton_pdl

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 10000, (int(n),), generator=g).tolist()
               for n in torch.randint(5, 700, (48,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True, logprobs=1)
    outs, switches = {}, (triton_pdl.PDL, nk.SPLITK_ADD_NORM, nk.TRITON_QKV)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(QWEN3_0_6B_CONFIG.read_text())
        for pdl in (False, True):
            triton_pdl.PDL, nk.SPLITK_ADD_NORM, nk.TRITON_QKV = pdl, True, True
            llm = LLM(tmp, dtype="bfloat16", load_format="dummy", kv_cache_dtype="fp8", max_num_seqs=64,
                      max_model_len=1024)
            try:
                outs[pdl] = [(o.token_ids, o.outputs[0].logprobs) for o in
                             llm.generate(prompts[:1] + prompts, params, use_tqdm=False)]
            finally:
                llm.shutdown()
                triton_pdl.PDL, nk.SPLITK_ADD_NORM, nk.TRITON_QKV = switches
    same_tokens = sum(a[0] == b[0] for a, b in zip(outs[False], outs[True]))
    same_logprobs = sum(a[1] == b[1] for a, b in zip(outs[False], outs[True]))
    assert same_tokens == same_logprobs == len(prompts) + 1, (same_tokens, same_logprobs)
    return dict(sequences=len(prompts) + 1, same_tokens=same_tokens, same_logprobs=same_logprobs)


# -- 4. the seed benchmark -----------------------------------------------------------------------------------------
def bench(cap, out, words_variants=(), tilings=(), splitk=False, pdl=False, qkv=False, flat=False):
    """auto, then fp8 as the backend reads it; then fp8 with each of ``words_variants`` ("asm", "convert+K",
    "bytes", ...: ``TritonBackend.fp8_words`` and ``fp8_words_k`` for the run; "@wN" after it: the decode kernel
    splits the KV below N programs per SM, ``DECODE_WAVES``), to compare the decode kernel's launches; then fp8 with
    each of ``tilings`` ("64x3": the FP8 decode launches with tiles of 64 tokens and 3 stages, in place of
    ``decode_launch``'s); with ``splitk``, auto and fp8 once more with o and down split along K
    (``nanovllm.kernels.SPLITK_ADD_NORM``); with ``pdl``, auto and fp8 (and with ``splitk`` fp8 split along K)
    once more with the other setting of programmatic dependent launch (``nanovllm.triton_pdl.PDL``).  Each run
    sets the backend's class attributes, ``decode_launch`` and those switches for its engine and puts them
    back after.  With ``qkv``, auto and fp8 with every kernel of a decode layer Triton's (split-K, the qkv GEMM
    too: ``nanovllm.kernels.TRITON_QKV``) and PDL on.  With ``flat``, fp8 with the flat decode
    (``TritonBackend.fp8_flat``)."""
    from nanovllm import bench as nb
    from nanovllm import kernels as nk
    from nanovllm import triton_pdl
    from nanovllm.attention import triton_kernels as tk

    backend = tk.TritonBackend
    default = dict(words=backend.fp8_words, k_words=backend.fp8_words_k, waves=tk.DECODE_WAVES, tiling=None,
                   splitk=nk.SPLITK_ADD_NORM, pdl=triton_pdl.PDL, qkv=nk.TRITON_QKV, flat=backend.fp8_flat)
    rates = {}
    runs = [("auto", "auto", default), ("fp8", "fp8", default)]
    for v in words_variants:
        how, _, waves = v.partition("@w")
        words = how.split("+")[0]
        runs.append((f"fp8_{v}", "fp8", dict(default, words=None if words == "bytes" else words,
                                             k_words=how.endswith("+K"),
                                             waves=int(waves) if waves else default["waves"])))
    for t in tilings:  # "64x3": the FP8 decode launches with tiles of 64 tokens and 3 stages
        n, _, st = t.partition("x")
        runs.append((f"fp8_{t}", "fp8", dict(default, tiling=dict(block_n=int(n), num_stages=int(st)))))
    if splitk:
        runs += [("auto_splitk", "auto", dict(default, splitk=True)), ("fp8_splitk", "fp8", dict(default, splitk=True))]
    if pdl:  # the other setting of the PDL switch than the package's
        other, tag = not default["pdl"], "_pdl" if not default["pdl"] else "_nopdl"
        runs += [("auto" + tag, "auto", dict(default, pdl=other)), ("fp8" + tag, "fp8", dict(default, pdl=other))]
        if splitk:
            runs.append(("fp8_splitk" + tag, "fp8", dict(default, splitk=True, pdl=other)))
    if flat:
        runs.append(("fp8_flat", "fp8", dict(default, flat=True)))
    if qkv:
        chain = dict(default, splitk=True, pdl=True, qkv=True)
        runs += [(f"{kv}_triton_chain_pdl", kv, chain) for kv in ("auto", "fp8")]
    launch = tk.decode_launch

    def use(run):  # the decode reads a run asks for
        backend.fp8_words, backend.fp8_words_k, tk.DECODE_WAVES = run["words"], run["k_words"], run["waves"]
        nk.SPLITK_ADD_NORM, triton_pdl.PDL, nk.TRITON_QKV = run["splitk"], run["pdl"], run["qkv"]
        backend.fp8_flat = run["flat"]

    for name, kv, run in runs:
        if run["tiling"]:
            def fixed(*a, tiling=run["tiling"], **kw):
                auto = launch(*a, **kw)
                return dict(auto, **tiling) if kw.get("fp8") else auto
            tk.decode_launch = fixed
        argv = ["--engine", "nanovllm", "--kv-cache-dtype", kv, "--json", str(out / "fp8_bench.jsonl")]
        if cap:
            argv += ["--gpu-memory-utilization", f"{cap['gpu_memory_utilization']:.4f}"]
        use(run)
        try:
            [r] = nb.main(argv)
            rates[name] = r.tok_per_s
        except SystemExit as e:  # an engine failed: bench printed why; keep the other's number
            rates[name] = f"failed ({e.code})"
        finally:
            use(default)
            tk.decode_launch = launch
        print(f"  seed benchmark, {name} (kv_cache_dtype={kv}, fp8_words={run['words']}, "
              f"fp8_words_k={run['k_words']}, DECODE_WAVES={run['waves']}, decode tiling {run['tiling']}, "
              f"split-K {run['splitk']}, PDL {run['pdl']}, Triton qkv {run['qkv']}, flat {run['flat']}): "
              f"{rates[name]}", flush=True)
    if all(isinstance(v, float) for v in rates.values()):
        rates.update({f"{n}_over_auto": rates[n] / rates["auto"] for n in list(rates) if n != "auto"})
    return {f"tok_per_s_{k}" if "over" not in k else k: v for k, v in rates.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/nanovllm-fp8")
    ap.add_argument("--only", default="kernels,embedded,qwen3,bench")
    ap.add_argument("--cap-gib", type=float, default=None, help="size the engines for a card of this many GiB")
    ap.add_argument("--tilings", default="",
                    help="bench: also fp8 with these decode tilings (tokens x stages), e.g. 64x3,128x3")
    ap.add_argument("--splitk", action="store_true", help="bench: also auto and fp8 with o and down split along K")
    ap.add_argument("--pdl", action="store_true",
                    help="the same tokens with and without PDL; bench: also auto and fp8 with the other setting")
    ap.add_argument("--qkv", action="store_true",
                    help="bench: also auto and fp8 with a decode layer all Triton, PDL on")
    ap.add_argument("--flat", action="store_true", help="bench: also fp8 with the flat decode (fp8_flat)")
    ap.add_argument("--words", default="", help="bench: also fp8 with these decode reads, e.g. bytes,convert,asm+K")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fp8_check.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = torch.cuda.get_device_properties(0).total_memory
    cap = {}
    if args.cap_gib:
        cap = dict(gpu_memory_utilization=min(1.0, args.cap_gib * (1 << 30) / total))
    print(f"{torch.cuda.get_device_name(0)} ({total / (1 << 30):.0f} GiB, capability "
          f"{torch.cuda.get_device_capability(0)}), torch {torch.__version__}"
          + (f", capped at {args.cap_gib:g} GiB (gpu_memory_utilization={cap['gpu_memory_utilization']:.3f})"
             if cap else ""), flush=True)
    only = set(args.only.split(","))
    t = time.perf_counter()
    try:
        if "kernels" in only:
            section("kernels: Triton FP8 store, decode, prefill vs the reference", kernels)
        if "embedded" in only:
            section("embedded SmolLM2-135M bf16: fp8 vs auto", embedded)
        if "qwen3" in only:
            section("Qwen3-0.6B shape, random weights, bf16: fp8 vs auto", qwen3)
        if args.pdl:
            section("PDL off vs on: the same tokens and logprobs", pdl_same)
        if "bench" in only:
            section("seed benchmark: auto vs fp8" + (f" (capped at {args.cap_gib:g} GiB)" if cap else ""),
                    bench, cap, out, [w for w in args.words.split(",") if w],
                    [t for t in args.tilings.split(",") if t], args.splitk, args.pdl, args.qkv, args.flat)
    finally:
        with open(out / "fp8_check.jsonl", "a") as f:
            for r in RESULTS:
                f.write(json.dumps({**r, "gpu": torch.cuda.get_device_name(0), "cap_gib": args.cap_gib,
                                    "date": time.strftime("%Y-%m-%d")}, default=str) + "\n")
        print(f"{time.perf_counter() - t:.0f} s; " + ("FAILED: " + ", ".join(FAILS) if FAILS else "ALL PASSED"),
              flush=True)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
