"""Throughput and latency benchmarks: ``python -m nanovllm.bench``.

Three workloads:

* ``seed`` (the default on a GPU): nano-vllm's benchmark.  Qwen3-0.6B shape (random weights unless a
  checkpoint is given), 256 requests; ``random.seed(0)``; for each request a prompt length
  ``randint(100, 1024)`` and that many token ids ``randint(0, 10000)``, then for each an output length
  ``randint(100, 1024)``; ``temperature=0.6``, EOS ignored; one short warm-up; throughput = output tokens
  / wall seconds (133,966 output tokens).
* ``chat`` (the default on a CPU): the embedded SmolLM2-135M-Instruct, 32 chat prompts, 64 greedy
  tokens each, nanovllm next to HF transformers' batched ``generate`` (left-padded).
* ``latency``: requests in groups of ``--batch-size`` B (1 and 16 on a GPU, 1 on a CPU), each group submitted
  at once and run until all its requests finish, greedy, EOS ignored: a few warm-up groups, then N measured
  requests (rounded up to whole groups); time to first token (TTFT: from the group's start to the request's
  first token, so the whole prefill and the first sampling) and inter-token latency (ITL: the gap between one
  output token of a request and its next, i.e. time per output token), each as median, p99 and mean in ms,
  one result per engine and batch size.  Each prompt is fresh random token ids and the prefix cache is
  emptied before each group, so every TTFT counts its whole prefill.  At batch 1 nanovllm also times
  ``LLM.generate([prompt], max_tokens=1)`` whole (``generate()`` TTFT).  Model: as ``seed`` on a GPU (1,000-token
  prompts, 128 output tokens), the embedded SmolLM2 on a CPU (with few, short requests there).
* ``serve``: online serving (``bench_serve.py``).  The server runs (nanovllm's in this process, or
  ``transformers serve`` as a subprocess) and a client sends streaming requests with Poisson arrivals at each
  ``--request-rate`` (req/s, ``inf``: all at once), ``--prompt-kind random`` (random token ids) or ``chat``
  (the chat questions); throughput, request throughput, TTFT and ITL (median, p99, mean), one result per
  rate.  Model: as ``seed`` on a GPU (200 requests at 4, 16, 64 and inf req/s, 256-1,024-token prompts,
  128-256 output tokens), the embedded SmolLM2 on a CPU (8 requests at 4 and inf req/s, 32 and 8 tokens);
  chat prompts always the embedded SmolLM2 unless ``--model``.

``--engine`` picks what runs: ``nanovllm``, ``hf`` (transformers; continuous batching with
``paged|sdpa`` attention and CUDA graphs on a GPU, batched ``generate`` on a CPU; one ``generate`` per
group of left-padded prompts for ``latency``; ``transformers serve`` for ``serve``), ``vllm`` (when installed;
not for ``latency`` or ``serve``), or several separated by commas, all on the identical workload.  Engines run
one after another, each freed before the next starts (a GPU cannot hold two); one that fails is reported as
FAILED, the others still run, and the exit status is 1.  A user error (a bad flag, a missing model) is one
line and exit 2, before anything is loaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

QWEN3_0_6B_CONFIG = Path(__file__).parent / "configs" / "qwen3-0.6b.json"

CHAT_QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.", "What is a prime number?", "Give three tips for learning to cook.",
    "Why is the sky blue?", "Summarize the plot of Romeo and Juliet.", "What does a CPU do?",
    "How do vaccines work?", "Name three planets and one fact about each.", "What is gravity?",
    "Describe a cat to someone who has never seen one.", "What is the difference between weather and climate?",
    "How does a bicycle stay upright?", "Write a short poem about autumn.", "What is machine learning?",
    "Explain what a recipe is to a child.", "Why do we have seasons?", "What is the tallest mountain?",
    "Give me a fun fact about octopuses.", "How do airplanes fly?", "What is an API?",
    "Suggest a name for a friendly robot.", "What causes rain?", "How many legs does a spider have?",
    "What is the Pythagorean theorem?", "Describe the taste of lemon.", "What is a black hole?",
    "How should I start learning to program?", "What is the water cycle?", "Tell me a short joke.",
    "What are the primary colors?",
]


@dataclass
class Workload:
    name: str
    prompts: list  # token-id lists (seed, latency); the chat workload's come from texts through the chat template
    max_tokens: list[int]
    temperature: float
    model: str | None
    random_weights: bool
    texts: list[str] = field(default_factory=list)
    warmup: list = field(default_factory=list)  # latency: the warm-up requests, (prompt, output tokens)
    # latency: per batch size B, (warm-up groups, measured groups), each group B (prompt, output tokens) pairs
    groups: dict = field(default_factory=dict)
    # serve: per request rate, (rate, its (prompt, output tokens) requests, their send times in seconds)
    rounds: list = field(default_factory=list)
    prompt_kind: str | None = None  # serve: "random" (token ids) or "chat" (questions)

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def seed_workload(num_requests=256, prompt_len=(100, 1024), output_len=(100, 1024), model=None,
                  random_weights=None) -> Workload:
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(*prompt_len))] for _ in range(num_requests)]
    max_tokens = [random.randint(*output_len) for _ in range(num_requests)]
    if random_weights is None:
        random_weights = model is None
    return Workload("seed", prompts, max_tokens, 0.6, model, random_weights)


def chat_workload(num_requests=32, max_tokens=64, model=None) -> Workload:
    questions = [CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)] for i in range(num_requests)]
    return Workload("chat", [], [max_tokens] * num_requests, 0.0, model, False, questions)


def latency_workload(num_requests=32, prompt_len=(1000, 1000), output_len=(128, 128), warmup=3, model=None,
                     random_weights=False, batch_sizes=(1,)) -> Workload:
    """Requests for latency timing, in groups of each batch size B: random token ids (no two prompts share a
    prefix), greedy, EOS ignored.  At batch B the measured requests are the first ``num_requests`` rounded up
    to a multiple of B, and ``warmup`` groups of B warm-up requests run first.  Each request is drawn whole
    before the next, and the warm-up ones from their own seed, so the first requests are the same whatever
    the batch sizes and ``warmup``."""
    def draw(rng, n):
        reqs = []
        for _ in range(n):
            length, out = rng.randint(*prompt_len), rng.randint(*output_len)
            reqs.append(([rng.randint(0, 10000) for _ in range(length)], out))
        return reqs

    measured = draw(random.Random(0), max(math.ceil(num_requests / b) * b for b in batch_sizes))
    spare = draw(random.Random(1), warmup * max(batch_sizes))

    def chunks(reqs, b):
        return [reqs[i:i + b] for i in range(0, len(reqs), b)]

    groups = {b: (chunks(spare[:warmup * b], b), chunks(measured[:math.ceil(num_requests / b) * b], b))
              for b in batch_sizes}
    return Workload("latency", [p for p, _ in measured], [n for _, n in measured], 0.0, model, random_weights,
                    warmup=spare, groups=groups)


@dataclass
class Result:
    engine: str
    workload: str
    requests: int
    output_tokens: int
    seconds: float
    device: str
    note: str = ""
    # the latency workload's, in milliseconds (None for the throughput workloads)
    ttft_ms_median: float | None = None
    ttft_ms_p99: float | None = None
    ttft_ms_mean: float | None = None
    itl_ms_median: float | None = None
    itl_ms_p99: float | None = None
    itl_ms_mean: float | None = None
    batch_size: int | None = None  # latency: requests submitted at once
    generate_ttft_ms_median: float | None = None  # latency, nanovllm at batch 1: LLM.generate(max_tokens=1), whole
    generate_ttft_ms_p99: float | None = None
    request_rate: float | None = None  # serve: requests sent per second (Poisson), inf: all at once
    prompt_kind: str | None = None  # serve: "random" or "chat"
    prompt_tokens: int | None = None  # serve: the prompts' tokens, as the server counted them

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def line(self) -> str:
        end = f"  [{self.device}]{' ' + self.note if self.note else ''}"
        itl = ("n/a (one output token)" if self.itl_ms_median is None else
               f"median {self.itl_ms_median:.2f} ms, p99 {self.itl_ms_p99:.2f} ms, mean {self.itl_ms_mean:.2f} ms")
        if self.request_rate is not None:
            return (f"{self.engine:>9}  serve {self.prompt_kind}, {self.request_rate:g} req/s: {self.requests} "
                    f"requests, {self.output_tokens:,} output tokens in {self.seconds:.2f} s = "
                    f"{self.tok_per_s:,.0f} tok/s, {self.req_per_s:.2f} req/s; TTFT median {self.ttft_ms_median:.2f} "
                    f"ms, p99 {self.ttft_ms_p99:.2f} ms, mean {self.ttft_ms_mean:.2f} ms; ITL {itl}{end}")
        if self.ttft_ms_median is not None:
            gen = ("" if self.generate_ttft_ms_median is None else
                   f"; generate() TTFT median {self.generate_ttft_ms_median:.2f} ms, "
                   f"p99 {self.generate_ttft_ms_p99:.2f} ms")
            return (f"{self.engine:>9}  {self.workload}, batch {self.batch_size}: {self.requests} requests, "
                    f"TTFT median {self.ttft_ms_median:.2f} ms, p99 {self.ttft_ms_p99:.2f} ms, "
                    f"mean {self.ttft_ms_mean:.2f} ms; ITL {itl}{gen}{end}")
        return (f"{self.engine:>9}  {self.workload}: {self.requests} requests, "
                f"{self.output_tokens:,} output tokens in {self.seconds:.2f} s = {self.tok_per_s:,.0f} tok/s{end}")

    def record(self) -> dict:
        """The JSON-lines row: the fields that apply (no latency fields for a throughput run); an infinite
        request rate as the string "inf" (JSON has no infinity)."""
        row = {k: v for k, v in asdict(self).items() if v is not None} | {"tok_per_s": round(self.tok_per_s, 1)}
        if self.request_rate is not None:
            row |= {"req_per_s": round(self.req_per_s, 3)}
            if math.isinf(self.request_rate):
                row["request_rate"] = "inf"
        return row


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: a value that was measured (with few samples, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_stats(ttft: list[float], itl: list[float]) -> dict:
    """Result's ttft/itl fields (median, p99, mean) from the measured milliseconds; none for an empty list."""
    stats = {}
    for name, ms in (("ttft", ttft), ("itl", itl)):
        if ms:
            stats |= {f"{name}_ms_median": statistics.median(ms), f"{name}_ms_p99": percentile(ms, 99),
                      f"{name}_ms_mean": statistics.fmean(ms)}
    return stats


def latency_result(engine: str, timings: list[tuple[float, list[float]]], device: str, note: str,
                   batch_size: int = 1) -> Result:
    """A Result from each measured request's (start, [time each output token arrived]); the requests of one
    group share their start, and the measured time is the groups' (start to last token of the group)."""
    ttft = [(times[0] - start) * 1e3 for start, times in timings]
    itl = [(b - a) * 1e3 for _, times in timings for a, b in zip(times, times[1:])]
    stats = latency_stats(ttft, itl)
    produced = sum(len(times) for _, times in timings)
    ends = {}
    for start, times in timings:
        ends[start] = max(ends.get(start, start), times[-1])
    seconds = sum(end - start for start, end in ends.items())
    return Result(engine, "latency", len(timings), produced, seconds, device, note, batch_size=batch_size,
                  **stats)


def model_folder(w: Workload, tmp: Path, resolved=None) -> Path | str:
    """The folder to load: the given model (``resolved``: its local folder), the embedded default, or a
    config-only folder (random weights)."""
    if w.random_weights:
        src = Path(resolved or w.model) / "config.json" if w.model else QWEN3_0_6B_CONFIG
        (tmp / "config.json").write_text(src.read_text())
        return tmp
    if w.model is None:
        from nanovllm.loading.embedded import embedded_model_dir

        return embedded_model_dir()
    return resolved or w.model


def chat_prompt_ids(w: Workload, tokenizer) -> list[list[int]]:
    ids = []
    for q in w.texts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False).input_ids)
    return ids


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_nanovllm(w: Workload, folder, device: str, args) -> Result:
    from nanovllm import LLM
    from nanovllm.config import engine_kwargs

    t = time.perf_counter()
    engine_args = {**engine_kwargs(args), "device": device, "load_format": "dummy" if w.random_weights else "auto"}
    llm = LLM(folder, **engine_args)
    print(f"nanovllm: engine ready in {time.perf_counter() - t:.1f} s ({llm!r})", file=sys.stderr)
    try:
        return (nanovllm_latency if w.name == "latency" else nanovllm_throughput)(llm, w, args)
    finally:  # whatever happened (Ctrl-C included): stop its workers, give back its KV cache and weights
        llm.shutdown()


def nanovllm_throughput(llm, w: Workload, args) -> Result:
    from nanovllm import SamplingParams

    prompts = chat_prompt_ids(w, llm.tokenizer) if w.name == "chat" else w.prompts
    params = [SamplingParams(temperature=w.temperature, ignore_eos=True, max_tokens=n) for n in w.max_tokens]
    llm.generate(prompts[:2], SamplingParams(temperature=w.temperature, max_tokens=8), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()  # the timed run must not find the warm-up's prompts in the cache
    if llm.spec is not None:
        llm.spec.reset_stats()
    sync(str(llm.device))
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=args.progress)
    sync(str(llm.device))
    seconds = time.perf_counter() - t
    produced = sum(len(o.token_ids) for o in outs)
    if produced != w.output_tokens:
        raise RuntimeError(f"nanovllm produced {produced} tokens, expected {w.output_tokens}")
    print_step_summary(llm.step_log)
    return Result("nanovllm", w.name, len(prompts), produced, seconds, device_name(llm.device),
                  f"backend={llm.runner.backend.name}{spec_note(llm)}")


def spec_note(llm) -> str:
    """With speculative decoding, its acceptance since the last ``reset_stats``: the share of drafts accepted
    and the tokens a sequence gained per verify step."""
    if llm.spec is None:
        return ""
    c = llm.config
    return (f" spec={c.speculative_method} k={c.num_speculative_tokens}: acceptance "
            f"{llm.spec.acceptance_rate:.1%}, {llm.spec.tokens_per_step:.2f} tokens/step")


def nanovllm_latency(llm, w: Workload, args) -> list[Result]:
    """Each group of requests driven by ``add_request`` and ``step`` (the plain step loop: a step returns its
    token ids on the host, so a token counts once the GPU has produced it).  The clock starts before the
    first ``add_request`` (which checks the prompt) and reads after each step.  At batch 1, then, the whole
    ``generate()`` call of each prompt with ``max_tokens=1``: what a user of ``LLM.generate`` waits for its
    first token (validation, the overlapped loop, building the output), without a progress bar."""
    from nanovllm import SamplingParams

    def group(reqs):
        llm.reset_prefix_cache()  # no earlier group's blocks: every prefill is computed in full
        params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for _, n in reqs]
        sync(str(llm.device))
        start = time.perf_counter()
        seqs = [llm.add_request(prompt, sp) for (prompt, _), sp in zip(reqs, params)]
        times = [[] for _ in seqs]
        while not all(seq.is_finished for seq in seqs):
            llm.step()
            now = time.perf_counter()
            for seq, ts in zip(seqs, times):  # (a chunk of a long prompt's prefill adds no token)
                ts.extend([now] * (seq.num_completion_tokens - len(ts)))
        for (_, n), ts in zip(reqs, times):
            if len(ts) != n:
                raise RuntimeError(f"nanovllm produced {len(ts)} tokens for a request, expected {n}")
        return [(start, ts) for ts in times]

    def generate_ms(prompt):
        llm.reset_prefix_cache()
        sync(str(llm.device))
        t = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1), use_tqdm=False)
        return (time.perf_counter() - t) * 1e3

    device, note, results = device_name(llm.device), f"backend={llm.runner.backend.name}", []
    for b, (warmup, measured) in w.groups.items():
        for reqs in warmup:
            group(reqs)
        if llm.spec is not None:
            llm.spec.reset_stats()
        timings = [t for reqs in measured for t in group(reqs)]
        results.append(latency_result("nanovllm", timings, device, note + spec_note(llm), b))
        if b == 1:
            for reqs in warmup:
                generate_ms(reqs[0][0])
            ms = [generate_ms(reqs[0][0]) for reqs in measured]
            results[-1].generate_ttft_ms_median = statistics.median(ms)
            results[-1].generate_ttft_ms_p99 = percentile(ms, 99)
    return results


def print_step_summary(log) -> None:
    """Where nanovllm's time went: prefill vs decode steps, and decode steps by batch size."""
    pre = [r for r in log if r[0]]
    dec = [r for r in log if not r[0]]
    out = [f"  prefill: {len(pre)} steps, {sum(r[1] for r in pre):,} tokens, {sum(r[3] for r in pre):.2f} s "
           f"({', '.join(f'{r[3] * 1e3:.0f}' for r in pre[:20])} ms)"]
    out.append(f"  decode:  {len(dec)} steps, {sum(r[1] for r in dec):,} tokens, {sum(r[3] for r in dec):.2f} s")
    for lo, hi in ((1, 16), (17, 64), (65, 128), (129, 192), (193, 10**9)):
        rows = [r for r in dec if lo <= r[2] <= hi]
        if rows:
            t = sum(r[3] for r in rows)
            out.append(f"    batch {lo:>3}-{min(hi, 999):>3}: {len(rows):>5} steps, {t:6.2f} s, "
                       f"{t / len(rows) * 1e3:6.2f} ms/step")
    print("\n".join(out), file=sys.stderr, flush=True)


def load_hf_model(folder, random_weights: bool, device: str, dtype, attn: str | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"attn_implementation": attn} if attn else {}
    if random_weights:
        cfg = AutoConfig.from_pretrained(folder)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(device)
    return model.eval()


def run_hf(w: Workload, folder, device: str, args) -> Result:
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if w.name == "latency":
        return run_hf_latency(w, folder, device, dtype)
    if device.startswith("cuda"):
        return run_hf_continuous(w, folder, device, dtype)
    from transformers import AutoTokenizer

    if len(set(w.max_tokens)) != 1:
        raise ValueError("HF batched generate needs one max_tokens for all requests; on a GPU it uses "
                         "continuous batching instead")
    model = load_hf_model(folder, w.random_weights, device, dtype)
    tok = AutoTokenizer.from_pretrained(folder) if w.name == "chat" else None
    prompts = chat_prompt_ids(w, tok) if w.name == "chat" else w.prompts
    n_new = max(w.max_tokens)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids=ids[:2, -8:], attention_mask=mask[:2, -8:], max_new_tokens=4, do_sample=False,
                       pad_token_id=0)  # warm-up
        sync(device)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        sync(device)
        seconds = time.perf_counter() - t
    produced = (out.shape[1] - width) * len(prompts)
    return Result("hf", w.name, len(prompts), produced, seconds, device_name(device), "generate, left-padded")


def run_hf_latency(w: Workload, folder, device: str, dtype) -> list[Result]:
    """One ``generate`` per group (greedy, ``min_new_tokens`` = ``max_new_tokens``: EOS ignored), its prompts
    left-padded to the longest with an attention mask, timed by a streamer: ``generate`` hands it the prompts
    before their prefill, then each step's tokens (one for every row) as they are chosen; the streamer waits
    for the GPU and reads the clock at each step.  TTFT is therefore ``generate``'s set-up, the prefill and
    the first token, measured in the same call that then decodes the rest (not a separate
    ``max_new_tokens=1`` call), and ITL the gaps between the tokens after it.  A group runs to its longest
    request's output; each request counts its own first tokens.  HF's default (dynamic) KV cache and
    attention."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.prompt_seen, self.times = False, []

        def put(self, value):
            if not self.prompt_seen:  # the first call is the prompts, before any work on them
                self.prompt_seen = True
                return
            sync(device)
            self.times.append(time.perf_counter())

        def end(self):
            pass

    model = load_hf_model(folder, w.random_weights, device, dtype)

    def group(reqs):
        width, n = max(len(p) for p, _ in reqs), max(k for _, k in reqs)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in reqs], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in reqs], device=device)
        clock = Clock()
        sync(device)
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, streamer=clock)
        if len(clock.times) != n:
            raise RuntimeError(f"HF generate streamed {len(clock.times)} tokens, expected {n}")
        return [(start, clock.times[:k]) for _, k in reqs]

    results = []
    with torch.inference_mode():
        for b, (warmup, measured) in w.groups.items():
            for reqs in warmup:
                group(reqs)
            timings = [t for reqs in measured for t in group(reqs)]
            padded = any(len({len(prompt) for prompt, _ in reqs}) > 1 for reqs in measured)
            note = "generate, timed by a streamer" + (", left-padded" if padded else "")
            results.append(latency_result("hf", timings, device_name(device), note, b))
    return results


def workload_prompts(w: Workload, folder) -> list[list[int]]:
    """Token ids of the workload's prompts (the chat workload goes through the model's chat template)."""
    if w.name != "chat":
        return w.prompts
    from transformers import AutoTokenizer

    return chat_prompt_ids(w, AutoTokenizer.from_pretrained(folder))


def run_hf_continuous(w: Workload, folder, device: str, dtype) -> Result:
    """transformers' continuous batching (paged attention, CUDA graphs), per-request max_new_tokens."""
    import torch
    from transformers import GenerationConfig

    prompts = workload_prompts(w, folder)

    model = load_hf_model(folder, w.random_weights, device, dtype, attn="paged|sdpa")
    gen = GenerationConfig(do_sample=w.temperature > 0, temperature=w.temperature or None, top_p=1.0, top_k=0,
                           eos_token_id=-1, max_new_tokens=max(w.max_tokens), pad_token_id=0)
    try:
        from transformers import ContinuousBatchingConfig

        # its cache takes max_memory_percent of what is free (0.9 by default); on a small card what is left
        # cannot hold its sampling's temporaries (8 GiB: out of memory in torch.multinomial), so leave more
        total = torch.cuda.mem_get_info(device)[1] if device.startswith("cuda") else 0
        cb = ContinuousBatchingConfig(use_cuda_graph=True, max_memory_percent=0.6 if total < (24 << 30) else None)
    except ImportError:
        cb = None
    kw = {"continuous_batching_config": cb} if cb is not None else {}
    with torch.no_grad():  # (its generation thread cannot use tensors made under inference_mode)
        model.generate_batch([prompts[0][:16]], generation_config=gen, max_new_tokens=8, **kw)  # warm-up
        manager = model.init_continuous_batching(generation_config=gen, **kw)
        manager.start()
        try:
            sync(device)
            t = time.perf_counter()
            for i, (p, n) in enumerate(zip(prompts, w.max_tokens)):
                manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
            produced, done = 0, 0
            while done < len(prompts):
                out = manager.get_result(timeout=60)
                if out is None:
                    raise RuntimeError("transformers continuous batching stalled")
                if out.is_finished():
                    produced += len(out.generated_tokens)
                    done += 1
            sync(device)
            seconds = time.perf_counter() - t
        finally:
            manager.stop(block=True)
    # a request that failed inside its generation thread (out of memory, say) comes back finished but short
    if produced != w.output_tokens:
        raise RuntimeError(f"transformers continuous batching produced {produced} tokens, expected "
                           f"{w.output_tokens} (a request failed in its generation thread)")
    return Result("hf", w.name, len(prompts), produced, seconds, device_name(device),
                  "continuous batching, paged|sdpa, CUDA graphs")


def run_vllm(w: Workload, folder, device: str, args) -> Result:
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError("vLLM is not installed") from e
    llm = vllm.LLM(str(folder), load_format="dummy" if w.random_weights else "auto", enforce_eager=False,
                   max_model_len=args.max_model_len, skip_tokenizer_init=w.name != "chat")
    params = [vllm.SamplingParams(temperature=w.temperature, ignore_eos=True, max_tokens=n) for n in w.max_tokens]
    prompts = [{"prompt_token_ids": p} for p in workload_prompts(w, folder)]
    llm.generate(prompts[:2], vllm.SamplingParams(max_tokens=8), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return Result("vllm", w.name, len(prompts), produced, seconds, device_name(device), f"vllm {vllm.__version__}")


def device_name(device) -> str:
    import torch

    device = str(device)
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.get_num_threads()} threads)"


ENGINES = {"nanovllm": run_nanovllm, "hf": run_hf, "vllm": run_vllm}


PROG = "python -m nanovllm.bench"
BENCH_PREFILL_TOKENS = 16384  # tokens per prefill step in the benchmark (nano-vllm's), not the LLM default

# per workload, (on a GPU, on a CPU): what a flag left out means.  The latency workload's GPU prompts are the
# issue's 1,000 tokens (16 of them fit one 16,384-token prefill step); it is kept short on a CPU, where a 135M
# model's prefill takes tens of milliseconds and a decode step several.
DEFAULTS = {
    "seed": {"num_requests": (256, 256), "prompt_len": ((100, 1024),) * 2, "output_len": ((100, 1024),) * 2},
    "chat": {"num_requests": (32, 32)},
    "latency": {"num_requests": (32, 4), "prompt_len": ((1000, 1000), (32, 32)),
                "output_len": ((128, 128), (8, 8)), "warmup_requests": (3, 1), "batch_size": ((1, 16), (1,))},
    "serve": {"num_requests": (200, 8), "prompt_len": ((256, 1024), (32, 32)), "output_len": ((128, 256), (8, 8)),
              "request_rate": ((4.0, 16.0, 64.0, math.inf), (4.0, math.inf))},
}


def parser():
    from nanovllm.__main__ import Parser, positive_int
    from nanovllm.config import add_engine_args

    def count(text: str) -> int:  # --warmup-requests 0 is allowed: none
        try:
            return positive_int(text) if text.strip() != "0" else 0
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}") from None

    p = Parser(prog=PROG, description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    def rate(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value > 0:  # (nan, 0 and negative rates)
            raise argparse.ArgumentTypeError(f"must be a positive number of requests per second or inf, got {text!r}")
        return value

    p.add_argument("--workload", choices=["seed", "chat", "latency", "serve"],
                   help="default: seed on a GPU, chat on a CPU")
    p.add_argument("--engine", default=None, help="nanovllm, hf, vllm, or several comma-separated "
                   "(default: nanovllm on a GPU and for latency, nanovllm,hf for chat on a CPU)")
    p.add_argument("--model", default=None, help="a model folder, .gguf file or hub id (default: the workload's)")
    p.add_argument("--random-weights", action="store_true", help="random weights from the model's config")
    p.add_argument("--num-requests", type=positive_int, default=None,
                   help="requests (latency: measured ones); default: seed 256, chat 32, latency 32 (4 on a CPU)")
    p.add_argument("--prompt-len", type=positive_int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="prompt tokens; default: seed 100 1024, latency 1000 1000 (32 32 on a CPU)")
    p.add_argument("--output-len", type=positive_int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="output tokens; default: seed 100 1024, latency 128 128 (8 8 on a CPU)")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="chat workload: tokens per request")
    p.add_argument("--warmup-requests", type=count, default=None,
                   help="latency workload: groups run before the measured ones, per batch size (default: 3, "
                   "1 on a CPU)")
    p.add_argument("--batch-size", type=positive_int, nargs="+", default=None, metavar="B",
                   help="latency workload: requests submitted at once, one or more sizes (default: 1 16, "
                   "1 on a CPU); --num-requests is rounded up to whole groups")
    p.add_argument("--request-rate", type=rate, nargs="+", default=None, metavar="R",
                   help="serve workload: requests per second (Poisson arrivals), one or more, inf: all at once "
                   "(default: 4 16 64 inf, 4 inf on a CPU)")
    p.add_argument("--prompt-kind", choices=["random", "chat"], default=None,
                   help="serve workload: random token-id prompts to /v1/completions or the chat questions to "
                   "/v1/chat/completions (default: random)")
    p.add_argument("--progress", action="store_true", help="show nanovllm's progress bar")
    # the engine's flags, from EngineConfig; the benchmark takes 16,384-token prefill steps (nano-vllm's)
    add_engine_args(p, exclude=("load_format",), defaults={"max_num_batched_tokens": BENCH_PREFILL_TOKENS},
                    aliases={"tensor_parallel_size": ["--tp"], "kvcache_block_size": ["--block-size"]})
    p.add_argument("--json", default=None, help="append results to this JSON-lines file")
    return p


def main(argv=None) -> list[Result]:
    """Run the benchmark; returns the results.  Exits 2 on a user error (before loading anything), 130 on
    Ctrl-C, 1 after every engine has run when one of them failed."""
    from nanovllm.__main__ import exit_interrupted

    try:
        p = parser()
        args = p.parse_args(argv)
        return bench(p, args, check_args(p, args))
    except KeyboardInterrupt:
        exit_interrupted(PROG)


def check_args(p, args) -> list[str] | None:
    """What argparse cannot check by itself; returns the engines asked for (None: the workload's default)."""
    for flag in ("prompt_len", "output_len"):
        lo_hi = getattr(args, flag)
        if lo_hi is not None and lo_hi[0] > lo_hi[1]:
            p.error(f"--{flag.replace('_', '-')} MIN MAX: MIN {lo_hi[0]} is above MAX {lo_hi[1]}")
    if args.batch_size is not None:
        if args.workload != "latency":
            p.error("--batch-size is for the latency workload (--workload latency)")
        if len(set(args.batch_size)) != len(args.batch_size):
            p.error(f"--batch-size names a size twice: {' '.join(map(str, args.batch_size))}")
        if max(args.batch_size) > args.max_num_seqs:
            p.error(f"--batch-size {max(args.batch_size)} is above --max-num-seqs {args.max_num_seqs}: "
                    "a group would not run as one batch")
    for flag in ("request_rate", "prompt_kind"):
        if getattr(args, flag) is not None and args.workload != "serve":
            p.error(f"--{flag.replace('_', '-')} is for the serve workload (--workload serve)")
    if args.request_rate is not None and len(set(args.request_rate)) != len(args.request_rate):
        p.error(f"--request-rate names a rate twice: {' '.join(map(str, args.request_rate))}")
    if args.engine is None:
        return None
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not engines:
        p.error(f"--engine names no engine: {args.engine!r}")
    for e in engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r}; choose from {sorted(ENGINES)}")
    if len(set(engines)) != len(engines):
        p.error(f"--engine names an engine twice: {args.engine!r}")
    for workload in ("latency", "serve"):
        if args.workload == workload and "vllm" in engines:
            p.error(f"the {workload} workload runs nanovllm and hf, not vllm")
    return engines


def bench(p, args, engines: list[str] | None) -> list[Result]:
    import torch

    from nanovllm.__main__ import check_engine_args, resolve_model_or_exit

    check_engine_args(p, args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device.startswith("cuda")
    workload = args.workload or ("seed" if gpu else "chat")
    default = {k: v[0 if gpu else 1] for k, v in DEFAULTS[workload].items()}
    given = {k: getattr(args, k) for k in default if getattr(args, k) is not None}
    opts = {**default, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}}
    engines = engines or (["nanovllm", "hf"] if workload == "chat" and not gpu else ["nanovllm"])
    resolved = resolve_model_or_exit(p, args.model) if args.model is not None else None
    if workload == "seed":
        w = seed_workload(opts["num_requests"], opts["prompt_len"], opts["output_len"], args.model,
                          args.random_weights or None)
    elif workload == "chat":
        w = chat_workload(opts["num_requests"], args.max_tokens, args.model)
    elif workload == "serve":  # random prompts: random weights as the seed's on a GPU; chat: a chat model
        from nanovllm.bench_serve import serve_workload

        kind = args.prompt_kind or "random"
        w = serve_workload(opts["num_requests"], opts["prompt_len"], opts["output_len"], opts["request_rate"], kind,
                           args.model, args.random_weights or (args.model is None and gpu and kind == "random"))
    else:  # random weights as the seed's on a GPU, the embedded model's real ones on a CPU
        w = latency_workload(opts["num_requests"], opts["prompt_len"], opts["output_len"], opts["warmup_requests"],
                             args.model, args.random_weights or (args.model is None and gpu), opts["batch_size"])
    size = (f"batch size {', '.join(map(str, w.groups))}: up to " if w.groups else "") + f"{len(w.max_tokens)}"
    if w.rounds:
        size = f"{w.prompt_kind} prompts at {', '.join(f'{r:g}' for r, _, _ in w.rounds)} req/s: {size}"
    print(f"workload {w.name}: {size} requests, {w.output_tokens:,} output tokens, "
          f"{'random' if w.random_weights else 'real'} weights, device {device}", file=sys.stderr)
    results, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(w, Path(tmp), resolved)
        if w.name == "serve" and w.random_weights:  # a tokenizer for the servers' text (bench_serve.py)
            from nanovllm.bench_serve import add_word_tokenizer

            add_word_tokenizer(folder, json.loads((Path(folder) / "config.json").read_text())["vocab_size"])
        for engine in engines:
            try:
                res = engines_for(w)[engine](w, folder, device, args)
            except Exception as e:  # one engine failing must not hide the others' results
                first, *rest = str(e).strip().splitlines() or [""]
                print(f"{engine:>9}  FAILED: {type(e).__name__}: {first}", flush=True)
                if rest:
                    print("\n".join(rest), file=sys.stderr, flush=True)
                failed.append(engine)
            else:
                for r in res if isinstance(res, list) else [res]:  # (latency: one per batch size)
                    results.append(r)
                    if w.name != "serve":  # (serve prints each rate's as it ends)
                        print(r.line(), flush=True)
            free(device)  # before the next engine: a GPU holds one engine's weights and KV cache, not two
    print_ratios(results)
    if args.json:
        write_json(args.json, results)
    if failed:
        print(f"{p.prog}: {len(failed)} of {len(engines)} engine(s) failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return results


def engines_for(w: Workload) -> dict:
    if w.name == "serve":
        from nanovllm.bench_serve import ENGINES as SERVE_ENGINES

        return SERVE_ENGINES
    return ENGINES


def free(device: str) -> None:
    """Give back what the last engine held.  Its run function has dropped it (and shut a nanovllm engine
    down); what is left are reference cycles, a failure's traceback among them, and on a GPU the blocks
    PyTorch's allocator keeps cached."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def print_ratios(results: list[Result]) -> None:
    """The first engine that ran against each other one, at the same batch size or request rate: throughput
    (how many times faster), and for the latency and serve workloads each median latency as a share of the
    other engine's (below 1: faster)."""
    if not results:
        return
    first = results[0].engine
    bases = {(r.batch_size, r.request_rate): r for r in results if r.engine == first}
    for r in results:
        base = bases.get((r.batch_size, r.request_rate))
        if r.engine == first or base is None:
            continue
        if base.request_rate is not None:
            print(f"{base.engine} / {r.engine} at {r.request_rate:g} req/s: {base.tok_per_s / r.tok_per_s:.2f}x the "
                  f"throughput, {base.ttft_ms_median / r.ttft_ms_median:.2f}x the median TTFT"
                  + (f", {base.itl_ms_median / r.itl_ms_median:.2f}x the median ITL"
                     if base.itl_ms_median is not None and r.itl_ms_median else ""))
        elif base.ttft_ms_median is not None:
            parts = [f"{base.ttft_ms_median / r.ttft_ms_median:.2f}x the median TTFT"]
            if base.itl_ms_median is not None and r.itl_ms_median:
                parts.append(f"{base.itl_ms_median / r.itl_ms_median:.2f}x the median ITL")
            print(f"{base.engine} / {r.engine} at batch {r.batch_size}: {', '.join(parts)}")
        else:
            print(f"{base.engine} / {r.engine}: {base.tok_per_s / r.tok_per_s:.2f}x")


def write_json(path: str, results: list[Result]) -> None:
    import torch

    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    with open(path, "a") as f:
        for r in results:
            f.write(json.dumps({**r.record(), **versions, "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    main()
