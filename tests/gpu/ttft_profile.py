"""Where a lone request's time to first token goes, on the GPU machine:

    PYTHONPATH=. python3 tests/gpu/ttft_profile.py [--eager] [--max-num-seqs N] [--no-profile]

Qwen3-0.6B's shape with random weights in bf16, as ``nanovllm.bench --workload latency``. Prints the
start-up time of the first engine in the process (cold) and of the next (warm); the TTFT (median of 10,
``add_request`` to the first token on the host) by prompt length, for 16 requests at once, and through
``generate()`` (the whole call, with and without its progress bar); the first step of a 1000-token prompt
cut into schedule / forward / logits / sample+copy (each followed by a synchronize, so the pieces add up to
a slower whole); and a profile of that step: the top kernels by GPU time and the step's GPU busy time
against its wall time (the gap is the host's launch overhead)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.bench import QWEN3_0_6B_CONFIG  # noqa: E402


def ttft(llm, n: int, reps: int = 10) -> float:
    times = []
    for r in range(reps + 2):
        llm.reset_prefix_cache()
        prompt = [(7 * r + 13 * i) % 10000 for i in range(n)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        seq = llm.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        while not seq.is_finished:
            llm.step()
        if r >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def ttft_batch(llm, n: int, batch: int, reps: int = 5) -> tuple[float, float]:
    """``batch`` requests of ``n`` tokens added at once: (median, last) time to each one's first token, ms
    (medians over ``reps``)."""
    med, last = [], []
    for r in range(reps + 1):
        llm.reset_prefix_cache()
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        seqs, first = [llm.add_request([(7 * r + 13 * i + 101 * j) % 10000 for i in range(n)], params)
                       for j in range(batch)], {}
        while len(first) < batch:
            llm.step()
            now = time.perf_counter()
            first.update({s.seq_id: now - t for s in seqs if s.is_finished and s.seq_id not in first})
        if r:
            med.append(statistics.median(first.values()))
            last.append(max(first.values()))
    return statistics.median(med) * 1e3, statistics.median(last) * 1e3


def generate_ttft(llm, n: int, reps: int = 10, **kw) -> float:
    """``llm.generate`` of one prompt for one token: the whole call, ms (median)."""
    times = []
    for r in range(reps + 2):
        llm.reset_prefix_cache()
        prompt = [(11 * r + 13 * i) % 10000 for i in range(n)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), **kw)
        if r >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def generate_overhead(llm, n: int) -> None:
    """Where ``generate()``'s time goes beyond the step path's: the call timed as it is, without its
    gc.freeze, with the plain loop instead of the overlapped one, and a cProfile of one call."""
    import cProfile
    import gc
    import pstats

    print(f"  generate() of one {n}-token prompt, one token: {generate_ttft(llm, n, use_tqdm=False):.2f} ms as is")
    freeze, unfreeze = gc.freeze, gc.unfreeze
    gc.freeze = gc.unfreeze = lambda: None
    try:
        print(f"    without gc.freeze/unfreeze: {generate_ttft(llm, n, use_tqdm=False):.2f} ms")
    finally:
        gc.freeze, gc.unfreeze = freeze, unfreeze
    overlapped, llm.overlapped = llm.overlapped, None
    try:
        print(f"    plain loop (no overlap): {generate_ttft(llm, n, use_tqdm=False):.2f} ms")
    finally:
        llm.overlapped = overlapped
    t = time.perf_counter()
    gc.collect()
    print(f"    one full gc.collect(): {(time.perf_counter() - t) * 1e3:.2f} ms; gc counts {gc.get_count()}, "
          f"thresholds {gc.get_threshold()}, objects {len(gc.get_objects())}")
    prof = cProfile.Profile()
    prompt = [(5 * i) % 10000 for i in range(n)]
    for _ in range(3):
        llm.reset_prefix_cache()
        prof.enable()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
        prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(18)


def pieces(llm, n: int) -> dict:
    """The first step of an ``n``-token prompt: schedule, the forward pass as the engine runs it (a captured
    prefill graph when one fits), the LM head, sampling and the copy to the host."""
    out = {}
    for r in range(5):
        llm.reset_prefix_cache()
        seq = llm.add_request([(3 * r + i) % 10000 for i in range(n)],
                              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        sync = torch.cuda.synchronize
        sync()
        t0 = time.perf_counter()
        batch = llm.scheduler.schedule()
        t1 = time.perf_counter()
        with torch.inference_mode():
            hidden, rows = llm.runner.forward(batch)
            sync()
            t2 = time.perf_counter()
            logits = llm.runner.model.compute_logits(hidden[rows])
            sync()
            t3 = time.perf_counter()
            tokens = llm.runner.sampler(logits, [s for i, s in enumerate(batch.seqs) if batch.samples(i)]).tolist()
            t4 = time.perf_counter()
        llm.scheduler.postprocess(batch, tokens)
        assert seq.is_finished
        out = {"schedule": t1 - t0, "forward": t2 - t1, "logits": t3 - t2, "sample+copy": t4 - t3}
    return {k: v * 1e3 for k, v in out.items()}


def profile(llm, n: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    llm.reset_prefix_cache()
    ttft(llm, n, reps=1)
    seq = llm.add_request(list(range(1, n + 1)), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t = time.perf_counter()
        while not seq.is_finished:
            llm.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    events = p.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e3
    print(f"profiled {n}-token prefill step: wall {wall * 1e3:.2f} ms (with the profiler), "
          f"GPU busy {gpu:.2f} ms, kernels launched "
          f"{sum(e.count for e in events if e.self_device_time_total > 0)}")
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--generate-only", action="store_true", help="only where generate()'s time goes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(Path(QWEN3_0_6B_CONFIG).read_text())
        kw = dict(load_format="dummy", enforce_eager=args.eager)
        if args.max_num_seqs:
            kw["max_num_seqs"] = args.max_num_seqs
        starts = []
        for _ in range(2):  # the first engine in this process (cold), then a second one (warm)
            t = time.perf_counter()
            llm = LLM(tmp, **kw)
            starts.append(time.perf_counter() - t)
            if len(starts) == 1:
                llm.shutdown()
        print(f"{llm!r} eager={args.eager}: start-up {starts[0]:.2f} s cold (first engine in the process), "
              f"{starts[1]:.2f} s warm (the next one); prefill graphs "
              f"{getattr(llm.runner.prefill_graphs, 'token_sizes', None)}")
        if args.generate_only:
            generate_overhead(llm, 16)
            llm.shutdown()
            return
        for n in (1, 16, 64, 256, 1000, 1024, 2048, 4000):
            print(f"  TTFT {n:5d} prompt tokens: {ttft(llm, n):7.2f} ms")
        for n in (256, 1000):
            med, last = ttft_batch(llm, n, 16)
            print(f"  TTFT 16 requests of {n} tokens at once: median {med:.2f} ms, last {last:.2f} ms")
        for n in (16, 1000):
            print(f"  generate() of one {n}-token prompt, one token: {generate_ttft(llm, n, use_tqdm=False):.2f} ms "
                  f"(use_tqdm=False), {generate_ttft(llm, n):.2f} ms (default use_tqdm)")
        print("  first step of a 1000-token prompt, in pieces (ms):",
              {k: round(v, 2) for k, v in pieces(llm, 1000).items()})
        if not args.no_profile:
            profile(llm, 1000)
        llm.shutdown()


if __name__ == "__main__":
    main()
