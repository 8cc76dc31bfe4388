"""``python -m nanovllm "prompt"``: generate from the command line.

With no prompt it runs a small demo batch on the embedded SmolLM2-135M-Instruct and prints the
completions and the throughput.
"""

from __future__ import annotations

import argparse
import sys
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

PROG = "python -m nanovllm"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # argparse's code for a user error; 128 + SIGINT, as shells report it


# -- what both command-line tools share (the benchmark imports these) -------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse, but a user error is one line, ``prog: error: ...``, and exit 2.  The tools' usage runs to
    a screenful (one flag per engine argument), which would bury the line that says what is wrong."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message) -> str:
    """A message on one line: some errors quote a library's message of several lines (the hub's, say)."""
    return " ".join(str(message).split())


def positive_int(text: str) -> int:
    """An argparse type: ``--num-requests 0`` is a mistake, not a request for the default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_engine_args(p: argparse.ArgumentParser, args, **override) -> None:
    """The engine flags checked as ``LLM()`` would check them, before anything is loaded: ``--tp 0``,
    ``--device tpu`` or ``--dtype float8`` fail in a second, not after the model has been read."""
    import torch

    from nanovllm.config import EngineConfig, engine_kwargs
    from nanovllm.loading.resolve import resolve_device, resolve_dtype

    try:
        config = EngineConfig(**{**engine_kwargs(args), **override})
        device = resolve_device(config.device)
        if config.dtype != "auto":  # "auto" depends on the model's config; a named dtype does not
            resolve_dtype(config.dtype, device, None)
        if config.tensor_parallel_size > 1 and device.type == "cuda":
            if config.tensor_parallel_size > torch.cuda.device_count():
                raise ValueError(f"--tp {config.tensor_parallel_size} asks for more GPUs than the "
                                 f"{torch.cuda.device_count()} there are")
    except (TypeError, ValueError) as e:
        p.error(str(e))


def resolve_model_or_exit(p: argparse.ArgumentParser, model):
    """The model's local folder, or one line saying why there is none (no such path, the hub unreachable or
    no such id there, a folder without config.json) and exit 2."""
    from nanovllm.loading.resolve import resolve_model

    try:
        return resolve_model(model)
    except (OSError, TypeError, ValueError) as e:
        p.error(str(e))


def exit_interrupted(prog: str):
    """Ctrl-C: one line and exit 130, not a traceback through the engine's loop."""
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)


# -- the command ------------------------------------------------------------------------------------------------
def parser() -> Parser:
    from nanovllm.config import DEFAULT_MODEL, add_engine_args

    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p


def main(argv=None) -> None:
    try:
        p = parser()
        run(p, p.parse_args(argv))
    except KeyboardInterrupt:
        exit_interrupted(PROG)


def run(p: Parser, args) -> None:
    from nanovllm.config import engine_kwargs
    from nanovllm.sampling_params import SamplingParams

    # every user error first, before the model is read
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    check_engine_args(p, args)
    folder = resolve_model_or_exit(p, args.model)
    prompts = args.prompt or DEMO_PROMPTS

    from nanovllm import LLM

    t = time.perf_counter()
    try:
        llm = LLM(folder, **engine_kwargs(args))
    except (TypeError, ValueError) as e:  # what only the model tells (a --tp its heads do not divide, say)
        p.error(str(e))
    try:
        print(f"loaded {llm!r} in {time.perf_counter() - t:.1f} s")
        use_chat = not args.raw and llm.tokenizer is not None and getattr(llm.tokenizer, "chat_template", None)
        t = time.perf_counter()
        try:
            if use_chat:
                outs = llm.chat([[{"role": "user", "content": q}] for q in prompts], params)
            else:
                outs = llm.generate(prompts, params)
        except (TypeError, ValueError) as e:  # a prompt the model cannot take (too long for max_model_len ...)
            p.error(str(e))
        seconds = time.perf_counter() - t
        for q, o in zip(prompts, outs):
            print(f"\n>>> {q}\n{o.text.strip()}  [{len(o.token_ids)} tokens, {o.finish_reason}]")
        n = sum(len(o.token_ids) for o in outs)
        print(f"\n{len(outs)} requests, {n} tokens in {seconds:.2f} s = {n / seconds:,.1f} tok/s")
    finally:
        llm.shutdown()  # a tensor-parallel engine's workers, on every way out (Ctrl-C included)


if __name__ == "__main__":
    main()
