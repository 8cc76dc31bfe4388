"""Throughput benchmarks: ``python -m nanovllm.bench``.

Two workloads:

* ``seed`` (the default on a GPU): nano-vllm's benchmark.  Qwen3-0.6B shape (random weights unless a
  checkpoint is given), 256 requests; ``random.seed(0)``; for each request a prompt length
  ``randint(100, 1024)`` and that many token ids ``randint(0, 10000)``, then for each an output length
  ``randint(100, 1024)``; ``temperature=0.6``, EOS ignored; one short warm-up; throughput = output tokens
  / wall seconds (133,966 output tokens).
* ``chat`` (the default on a CPU): the embedded SmolLM2-135M-Instruct, 32 chat prompts, 64 greedy
  tokens each, nanovllm next to HF transformers' batched ``generate`` (left-padded).

``--engine`` picks what runs: ``nanovllm``, ``hf`` (transformers; continuous batching with
``paged|sdpa`` attention and CUDA graphs on a GPU, batched ``generate`` on a CPU), ``vllm`` (when
installed), or several separated by commas, all on the identical workload.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
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
    prompts: list  # token-id lists (seed) or chat prompts as token ids (chat)
    max_tokens: list[int]
    temperature: float
    model: str | None
    random_weights: bool
    texts: list[str] = field(default_factory=list)

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


@dataclass
class Result:
    engine: str
    workload: str
    requests: int
    output_tokens: int
    seconds: float
    device: str
    note: str = ""

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def line(self) -> str:
        return (f"{self.engine:>9}  {self.workload}: {self.requests} requests, "
                f"{self.output_tokens:,} output tokens in {self.seconds:.2f} s = {self.tok_per_s:,.0f} tok/s  "
                f"[{self.device}]{' ' + self.note if self.note else ''}")


def model_folder(w: Workload, tmp: Path) -> Path | str:
    """The folder to load: the given model, the embedded default, or a config-only folder (random weights)."""
    if w.model is not None and not w.random_weights:
        return w.model
    if w.name == "chat" and w.model is None:
        from nanovllm.loading.embedded import embedded_model_dir

        return embedded_model_dir()
    src = Path(w.model) / "config.json" if w.model else QWEN3_0_6B_CONFIG
    (tmp / "config.json").write_text(src.read_text())
    return tmp


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
    from nanovllm import LLM, SamplingParams
    from nanovllm.config import engine_kwargs

    t = time.perf_counter()
    engine_args = {**engine_kwargs(args), "device": device, "load_format": "dummy" if w.random_weights else "auto"}
    llm = LLM(folder, **engine_args)
    print(f"nanovllm: engine ready in {time.perf_counter() - t:.1f} s ({llm!r})", file=sys.stderr)
    prompts = chat_prompt_ids(w, llm.tokenizer) if w.name == "chat" else w.prompts
    params = [SamplingParams(temperature=w.temperature, ignore_eos=True, max_tokens=n) for n in w.max_tokens]
    llm.generate(prompts[:2], SamplingParams(temperature=w.temperature, max_tokens=8), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()  # the timed run must not find the warm-up's prompts in the cache
    sync(str(llm.device))
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=args.progress)
    sync(str(llm.device))
    seconds = time.perf_counter() - t
    produced = sum(len(o.token_ids) for o in outs)
    assert produced == w.output_tokens, f"nanovllm produced {produced} tokens, expected {w.output_tokens}"
    res = Result("nanovllm", w.name, len(prompts), produced, seconds, device_name(llm.device),
                 f"backend={llm.runner.backend.name}")
    print_step_summary(llm.step_log)
    llm.shutdown()
    llm.runner.close()
    return res


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
    if device.startswith("cuda"):
        return run_hf_continuous(w, folder, device, dtype)
    from transformers import AutoTokenizer

    model = load_hf_model(folder, w.random_weights, device, dtype)
    tok = AutoTokenizer.from_pretrained(folder) if w.name == "chat" else None
    prompts = chat_prompt_ids(w, tok) if w.name == "chat" else w.prompts
    n_new = max(w.max_tokens)
    if len(set(w.max_tokens)) != 1:
        raise ValueError("HF batched generate needs one max_tokens for all requests; on a GPU it uses "
                         "continuous batching instead")
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

        cb = ContinuousBatchingConfig(use_cuda_graph=True)
    except ImportError:
        cb = None
    kw = {"continuous_batching_config": cb} if cb is not None else {}
    with torch.no_grad():  # (its generation thread cannot use tensors made under inference_mode)
        model.generate_batch([prompts[0][:16]], generation_config=gen, max_new_tokens=8, **kw)  # warm-up
        manager = model.init_continuous_batching(generation_config=gen, **kw)
        manager.start()
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
        manager.stop(block=True)
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


BENCH_PREFILL_TOKENS = 16384  # tokens per prefill step in the benchmark (nano-vllm's), not the LLM default


def main(argv=None) -> list[Result]:
    import torch

    from nanovllm.config import add_engine_args

    p = argparse.ArgumentParser(prog="python -m nanovllm.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["seed", "chat"], help="default: seed on a GPU, chat on a CPU")
    p.add_argument("--engine", default=None, help="nanovllm, hf, vllm, or several comma-separated "
                   "(default: nanovllm on a GPU, nanovllm,hf on a CPU)")
    p.add_argument("--model", default=None, help="a model folder, .gguf file or hub id (default: the workload's)")
    p.add_argument("--random-weights", action="store_true", help="random weights from the model's config")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, default=64, help="chat workload: tokens per request")
    p.add_argument("--progress", action="store_true", help="show nanovllm's progress bar")
    # the engine's flags, from EngineConfig; the benchmark takes 16,384-token prefill steps (nano-vllm's)
    add_engine_args(p, exclude=("load_format",), defaults={"max_num_batched_tokens": BENCH_PREFILL_TOKENS},
                    aliases={"tensor_parallel_size": ["--tp"], "kvcache_block_size": ["--block-size"]})
    p.add_argument("--json", default=None, help="append results to this JSON-lines file")
    args = p.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    workload = args.workload or ("seed" if device.startswith("cuda") else "chat")
    engines = (args.engine or ("nanovllm" if workload == "seed" else "nanovllm,hf")).split(",")
    for e in engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r}; choose from {sorted(ENGINES)}")
    if workload == "seed":
        w = seed_workload(args.num_requests or 256, tuple(args.prompt_len), tuple(args.output_len), args.model,
                          args.random_weights or None)
    else:
        w = chat_workload(args.num_requests or 32, args.max_tokens, args.model)
    print(f"workload {w.name}: {len(w.max_tokens)} requests, {w.output_tokens:,} output tokens, "
          f"{'random' if w.random_weights else 'real'} weights, device {device}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(w, Path(tmp))
        for engine in engines:
            try:
                res = ENGINES[engine](w, folder, device, args)
            except Exception as e:  # one engine failing must not hide the others' results
                print(f"{engine:>9}  FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            results.append(res)
            print(res.line(), flush=True)
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(f"{base.engine} / {r.engine}: {base.tok_per_s / r.tok_per_s:.2f}x")
    if args.json:
        versions = {"torch": torch.__version__}
        try:
            import triton

            versions["triton"] = triton.__version__
        except ImportError:
            pass
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({**asdict(r), "tok_per_s": round(r.tok_per_s, 1), **versions,
                                    "date": time.strftime("%Y-%m-%d")}) + "\n")
    return results


if __name__ == "__main__":
    main()
