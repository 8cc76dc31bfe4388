"""Engine checks and timings on a CUDA GPU, in one go (not collected by pytest; run by hand on a GPU machine):

    PYTHONPATH=. python3 tests/gpu/engine_check.py [--out DIR] [--skip-bench] [--skip-hf] [--skip-profile]
    PYTHONPATH=. python3 tests/gpu/engine_check.py --only checks,bench,profile,modes,prefill

1. float32 greedy tokens on the GPU (Triton backend, CUDA graphs, torch.compile, the overlapped loop) equal the
   reference path (PyTorch backend, eager) on a tiny Qwen3 and on the Qwen3-0.6B shape with random weights; also with
   prefix caching, chunked prefill and preemption;
2. bf16 logits of one forward within bf16 tolerance of HF transformers (Qwen3-0.6B shape, random weights);
   memory: an engine's CUDA memory returns at ``del`` (cycle collector off), ``shutdown()`` and the end of a
   ``with`` block; the KV cache is no larger than ``max_num_seqs x max_model_len`` needs, and decode graphs are
   captured only up to ``max_num_seqs``;
3. the seed benchmark, nanovllm and HF transformers in one run;
4. a profile of one decode step at batch 256: attention vs GEMMs vs sampling vs the rest;
and on request (``--only``) a prefill-step profile and decode-step latency eager vs graphs vs graphs +
torch.compile.  The profiles and timings step the engine synchronously (``llm.step()``), not overlapped.
Prints PASS/FAIL lines; never stops at the first failure.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's make_tiny_model
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.bench import QWEN3_0_6B_CONFIG  # noqa: E402

FAILS = []


def check(name):
    def wrap(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                fn(*a, **kw)
                print(f"PASS {name} ({time.perf_counter() - t:.1f} s)", flush=True)
            except Exception:
                FAILS.append(name)
                print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        return run
    return wrap


def save_random_qwen3(path: Path, dtype=torch.bfloat16, tiny=False):
    from transformers import AutoConfig, AutoModelForCausalLM

    if tiny:
        from conftest import make_tiny_model

        return make_tiny_model("qwen3", path)
    cfg = AutoConfig.for_model("qwen3", **{k: v for k, v in json.loads(QWEN3_0_6B_CONFIG.read_text()).items()
                                           if k not in ("architectures", "torch_dtype", "model_type")})
    cfg.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return model.eval()


def prompts_for(vocab, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, vocab, (70,), generator=g).tolist()
    out = []
    for i in range(n):
        tail = torch.randint(0, vocab, (int(torch.randint(1, 200, (1,), generator=g)),), generator=g).tolist()
        out.append(shared + tail if i % 2 else tail)
    return out


def compare_engines(path, vocab, max_tokens=24, **kw):
    prompts = prompts_for(vocab)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ref = LLM(path, device="cuda", dtype="float32", attention_backend="torch", enforce_eager=True, **kw)
    want = [o.token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    close(ref)
    fast = LLM(path, device="cuda", dtype="float32", attention_backend="triton", **kw)
    try:
        assert fast.runner.graphs is not None, "CUDA graphs were not captured"
        assert fast.runner.prefill_graphs is not None, "prefill graphs were not captured"
        assert fast.overlapped is not None, "generate() does not take the overlapped loop"
        _compare_rounds(fast, prompts, params, want)
    finally:
        close(fast)


def async_streams(path, vocab, max_tokens=24):
    """16 requests from 16 threads through AsyncLLM on the GPU (the overlapped loop, CUDA graphs): each
    stream's tokens equal the reference engine's; one aborted midway frees its blocks."""
    import threading

    from nanovllm.async_llm import AsyncLLM

    prompts = prompts_for(vocab, n=16, seed=3)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ref = LLM(path, device="cuda", dtype="float32", attention_backend="torch", enforce_eager=True)
    want = [o.token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    close(ref)
    with AsyncLLM(path, device="cuda", dtype="float32", attention_backend="triton") as engine:
        assert engine.llm.overlapped is not None, "AsyncLLM does not take the overlapped loop"
        got = {}

        def client(i):
            got[i] = [t for d in engine.add_request(prompts[i], params) for t in d.token_ids]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        bad = [i for i in range(16) if got.get(i) != want[i]]
        assert not bad, f"{len(bad)} of 16 streams differ, first {bad[0]}: {got.get(bad[0])} vs {want[bad[0]]}"
        long = engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
        it = iter(long)
        next(it)
        long.abort()
        assert list(it)[-1].finish_reason == "abort"
        bm = engine.llm.block_manager
        assert bm.num_free_blocks == bm.num_blocks, "the aborted request kept blocks"


def close(llm):
    llm.shutdown()  # the GPU memory (and tensor-parallel workers), even while something still holds the engine


def _compare_rounds(fast, prompts, params, want):
    for _ in range(2):  # second round: prefix-cache hits
        got = [o.token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
        bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        assert not bad, f"{len(bad)} of {len(prompts)} differ, first {bad[0]}: {got[bad[0]]} vs {want[bad[0]]}"
    assert fast.block_manager.num_free_blocks == fast.block_manager.num_blocks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated: checks, bench, profile, modes, prefill")
    args = ap.parse_args()
    parts = set(args.only.split(",")) if args.only else {"checks", "bench", "profile"}
    out = Path(args.out) if args.out else None
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    tmp = Path(tempfile.mkdtemp())
    if "checks" in parts:
        run_checks(tmp)
    if "bench" in parts and not args.skip_bench:
        from nanovllm import bench

        engines = "nanovllm" if args.skip_hf else "nanovllm,hf"
        argv = ["--engine", engines]
        if out:
            argv += ["--json", str(out / "bench.jsonl")]
        bench.main(argv)
    if "profile" in parts and not args.skip_profile:
        profile_decode(out)
        profile_decode(out, 16)
    if "prefill" in parts:
        profile_prefill(out)
    if "modes" in parts:
        decode_modes(out)
    print("FAILED: " + ", ".join(FAILS) if FAILS else "ALL PASSED")


def run_checks(tmp):
    @check("tiny qwen3 fp32: triton+graphs == torch reference (prefix cache, chunked prefill, preemption)")
    def _tiny():
        save_random_qwen3(tmp / "tiny", tiny=True)
        compare_engines(tmp / "tiny", 512, max_num_batched_tokens=64, num_kvcache_blocks=40, max_model_len=1024)
        compare_engines(tmp / "tiny", 512)
    _tiny()

    @check("tiny qwen3 fp32: mixed batches and AsyncLLM (overlapped loop, 16 streams) == torch reference")
    def _serving():
        compare_engines(tmp / "tiny", 512, max_num_batched_tokens=64, num_kvcache_blocks=40, max_model_len=1024,
                        mixed_batches=True)
        async_streams(tmp / "tiny", 512)
    _serving()

    hf = None

    @check("qwen3-0.6b shape fp32: triton+graphs == torch reference")
    def _big():
        nonlocal hf
        hf = save_random_qwen3(tmp / "q06")
        compare_engines(tmp / "q06", 10000, max_num_batched_tokens=512, num_kvcache_blocks=120)
    _big()

    @check("qwen3-0.6b shape bf16 logits within bf16 tolerance of HF transformers")
    def _logits():
        """Our bf16 logits must be as close to the float32 truth as HF's own bf16 logits are."""
        from nanovllm.engine.sequence import ScheduledBatch, Sequence

        llm = LLM(tmp / "q06", device="cuda", dtype="bfloat16", num_kvcache_blocks=512)
        prompts = prompts_for(10000, n=4)
        seqs = []
        for p in prompts:
            s = Sequence(10_000 + len(seqs), p)
            llm.block_manager.allocate(s)
            seqs.append(s)
        ours = llm.runner.logits(ScheduledBatch(seqs, [len(s) for s in seqs], True))
        for s in seqs:
            llm.block_manager.deallocate(s)
        close(llm)
        ref16, ref32 = [], []
        hf32 = type(hf).from_pretrained(tmp / "q06", dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], device="cuda")
                ref16.append(hf(ids).logits[0, -1].float())
                ref32.append(hf32(ids).logits[0, -1].float())
        del hf32
        ref16, ref32 = torch.stack(ref16), torch.stack(ref32)
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        ours_err, hf_err, vs_hf = rel(ours, ref32), rel(ref16, ref32), rel(ours, ref16)
        agree = (ours.argmax(-1) == ref16.argmax(-1)).float().mean().item()
        print(f"  relative L2 error vs float32 HF: ours {ours_err:.4f}, HF bf16 {hf_err:.4f}; ours vs HF bf16 "
              f"{vs_hf:.4f}; argmax agreement with HF bf16 {agree:.2f}")
        assert ours_err <= 1.5 * hf_err + 1e-3, "our bf16 logits are further from float32 than HF's bf16 ones"

    _logits()
    hf = None  # noqa: F841  (frees the HF model)
    torch.cuda.empty_cache()

    @check("KV cache sized by the configuration; decode graphs only up to max_num_seqs")
    def _kv_sizing():
        from nanovllm.utils import cdiv

        with LLM(tmp / "q06", device="cuda", max_num_seqs=4, max_model_len=512) as llm:
            need = 4 * cdiv(512, llm.config.kvcache_block_size)
            blocks = llm.runner.num_kvcache_blocks
            print(f"  {blocks} KV blocks of {llm.config.kvcache_block_size} tokens (the configuration needs {need}); "
                  f"graphs for batch sizes {llm.runner.graphs.batch_sizes}; started in {llm.startup_seconds:.1f} s")
            assert blocks <= need, f"{blocks} KV blocks, but max_num_seqs x max_model_len needs only {need}"
            assert llm.block_manager.num_blocks == blocks == llm.runner.kv_cache.shape[2]
            assert llm.runner.graphs.batch_sizes == [1, 2, 4], llm.runner.graphs.batch_sizes
    _kv_sizing()

    @check("memory release: del (gc off), shutdown() and leaving `with` give the CUDA memory back")
    def _release():
        memory_release(tmp / "q06")
    _release()


def memory_release(path, tolerance=4 << 20, reserved_tolerance=32 << 20):
    """``torch.cuda.memory_allocated()`` returns to its baseline (within ``tolerance``) when an engine that has
    generated is dropped with the cycle collector off, shut down, or left; ``memory_reserved()`` nearly so, since
    the runner empties the allocator's cache when it lets go (a few small tensors of the engine, freed after the
    runner, may keep their 2 MiB segments cached: ``reserved_tolerance``).  The baseline is taken after a first
    engine was made and dropped: what stays once per process (cuBLAS workspaces, compiled kernels) is not the
    engine's."""
    kw = dict(device="cuda", max_num_seqs=8, max_model_len=1024, num_kvcache_blocks=256)
    params = SamplingParams(temperature=0.6, max_tokens=16, ignore_eos=True, seed=1)
    prompts = prompts_for(10000, n=8)

    def used_engine():
        llm = LLM(path, **kw)
        assert llm.runner.graphs is not None, "CUDA graphs were not captured"
        llm.generate(prompts, params, use_tqdm=False)
        llm.add_request(prompts[0], params)  # left unfinished
        llm.step()
        return llm

    def measure():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    close(used_engine())
    gc.collect()
    torch.cuda.empty_cache()
    gc.disable()
    try:
        for how in ("del", "shutdown()", "with"):
            base = measure()
            llm = used_engine()
            held = measure()
            if how == "del":
                del llm
            elif how == "shutdown()":
                llm.shutdown()
            else:
                with llm:
                    pass
            after = measure()
            mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
            print(f"  {how}: allocated {mib(base[0])} -> {mib(held[0])} -> {mib(after[0])}, reserved {mib(base[1])} "
                  f"-> {mib(held[1])} -> {mib(after[1])}")
            assert after[0] - base[0] <= tolerance, f"{how}: {mib(after[0] - base[0])} still allocated"
            assert after[1] - base[1] <= reserved_tolerance, f"{how}: {mib(after[1] - base[1])} still reserved"
            llm = None  # (after shutdown() and with: an empty shell)
    finally:
        gc.enable()


def seed_engine(**kw):
    """An engine on the Qwen3-0.6B shape with random weights (its folder lives as long as the engine)."""
    tmp = tempfile.mkdtemp()
    (Path(tmp) / "config.json").write_text(QWEN3_0_6B_CONFIG.read_text())
    return LLM(tmp, load_format="dummy", **kw)


def profile_prefill(out):
    """Where one full prefill step (8192 tokens of seed-benchmark prompts) spends its time."""
    from torch.profiler import ProfilerActivity, profile

    from nanovllm.bench import seed_workload

    w = seed_workload(64)
    llm = seed_engine()
    for p in w.prompts:
        llm.add_request(p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=4))
    llm.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        batch, _ = llm.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    print(f"prefill step: {sum(batch.num_new_tokens)} tokens of {len(batch.seqs)} sequences, {wall:.1f} ms wall")
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=20)
    print(table)
    if out:
        (out / "prefill_profile.txt").write_text(table)
    llm.abort_all()
    close(llm)


def decode_modes(out):
    """Decode step latency: eager vs CUDA graphs vs graphs + torch.compile, by batch size.  "graphs" is the
    engine without the compiled elementwise functions: ``select_kernels`` is handed none for it."""
    from nanovllm import kernels

    rows = []
    original = kernels.compiled_functions
    try:
        for mode in ("eager", "graphs", "graphs+compile"):
            kernels.compiled_functions = (lambda: {}) if mode == "graphs" else original
            llm = seed_engine(enforce_eager=mode == "eager", max_num_seqs=256)
            if mode != "eager":
                assert llm.runner.graphs is not None, "CUDA graphs were not captured"
            for bsz in (1, 8, 32, 128, 256):
                for i in range(bsz):
                    llm.add_request([(7 * i + j) % 10000 for j in range(512)],
                                    SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=200))
                while True:
                    batch, _ = llm.step()
                    if not batch.is_prefill:
                        break
                for _ in range(5):
                    llm.step()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(30):
                    llm.step()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t) / 30 * 1e3
                rows.append((bsz, mode, round(ms, 3)))
                print(f"decode step, batch {bsz:>3}, {mode:>14}: {ms:.2f} ms", flush=True)
                llm.abort_all()
            close(llm)
    finally:
        kernels.compiled_functions = original
    if out:
        gpu = torch.cuda.get_device_name()
        lines = ["batch_size,mode,ms_per_step,gpu,date"]
        lines += [f"{b},{m},{ms},{gpu},{time.strftime('%Y-%m-%d')}" for b, m, ms in rows]
        (out / "gpu_decode_modes.csv").write_text("\n".join(lines) + "\n")


def profile_decode(out, num=256):
    """Time one decode step at batch ``num`` (contexts ~600) by kernel category."""
    from torch.profiler import ProfilerActivity, profile

    from nanovllm.bench import seed_workload

    w = seed_workload(num)
    llm = seed_engine()
    for p, n in zip(w.prompts, w.max_tokens):
        llm.add_request(p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n))
    while True:  # finish the prefills, then a few decode steps
        batch, _ = llm.step()
        if not batch.is_prefill and len(batch.seqs) == num:
            break
    for _ in range(50):
        llm.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        llm.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t) / 20 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            llm.step()
        torch.cuda.synchronize()
    cats = {"attention": 0.0, "gemm": 0.0, "sampling": 0.0, "kv store": 0.0, "other": 0.0}
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.device_type.name != "CUDA" or dev == 0:
            continue
        n = e.key.lower()
        if "qkv_rope" in n:
            cats["rope+store"] = cats.get("rope+store", 0.0) + dev
        elif "decode" in n or "attn" in n or "attention" in n or "_reduce" in n:
            cats["attention"] += dev
        elif "gemm" in n or "sm90" in n or "cutlass" in n or "nvjet" in n or "matmul" in n:
            cats["gemm"] += dev
        elif "store_kv" in n:
            cats["kv store"] += dev
        elif any(k in n for k in ("exponential", "argmax", "softmax", "div", "max", "distribution", "gumbel")):
            cats["sampling"] += dev
        else:
            cats["other"] += dev
    gpu_ms = sum(cats.values()) / 5 / 1e3
    print(f"decode step at batch {num}: {step_ms:.2f} ms wall, {gpu_ms:.2f} ms of GPU kernels; "
          f"host/idle {max(step_ms - gpu_ms, 0):.2f} ms")
    for k, v in cats.items():
        print(f"  {k:>10}: {v / 5 / 1e3:.3f} ms")
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
    print(table)
    if out:
        (out / f"decode_profile_{num}.txt").write_text(table)
    llm.abort_all()
    close(llm)


if __name__ == "__main__":
    main()
