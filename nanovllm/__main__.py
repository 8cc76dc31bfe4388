"""``python -m nanovllm "prompt"``: generate from the command line.

With no prompt it runs a small demo batch on the embedded SmolLM2-135M-Instruct and prints the
completions and the throughput.
"""

from __future__ import annotations

import argparse
import time

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about paged memory.",
    "Explain in two sentences why a KV cache speeds up text generation.",
    "Give three tips for writing readable code.",
    "What is the difference between a list and a tuple in Python?",
    "Name a famous physicist and one of their discoveries.",
    "Why is the sky blue?",
    "Suggest a name for a small, fast inference engine.",
]


def main(argv=None) -> None:
    from nanovllm.config import DEFAULT_MODEL, add_engine_args, engine_kwargs

    p = argparse.ArgumentParser(prog="python -m nanovllm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", help="prompt(s); none: a demo batch")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder, .gguf file or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="plain completion, without the chat template")
    # the engine's flags, from EngineConfig (its seed is the sampling --seed's fallback: not a flag here)
    add_engine_args(p, exclude=("seed",), aliases={"tensor_parallel_size": ["--tp"]})
    args = p.parse_args(argv)

    from nanovllm import LLM, SamplingParams

    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    prompts = args.prompt or DEMO_PROMPTS
    t = time.perf_counter()
    try:
        llm = LLM(args.model, **engine_kwargs(args))
    except (TypeError, ValueError) as e:  # a bad engine flag: say which, as argparse does
        p.error(str(e))
    print(f"loaded {llm!r} in {time.perf_counter() - t:.1f} s")
    use_chat = not args.raw and llm.tokenizer is not None and getattr(llm.tokenizer, "chat_template", None)
    t = time.perf_counter()
    if use_chat:
        outs = llm.chat([[{"role": "user", "content": q}] for q in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t
    for q, o in zip(prompts, outs):
        print(f"\n>>> {q}\n{o.text.strip()}  [{len(o.token_ids)} tokens, {o.finish_reason}]")
    n = sum(len(o.token_ids) for o in outs)
    print(f"\n{len(outs)} requests, {n} tokens in {seconds:.2f} s = {n / seconds:,.1f} tok/s")
    llm.shutdown()


if __name__ == "__main__":
    main()
