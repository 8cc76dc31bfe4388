"""The embedded model's greedy replies with each setting of the package's speed switches (not collected by pytest;
run on a GPU machine with the embedded model installed, e.g. through the GPU notes' env.sh):

    python3 tests/gpu/switch_tokens.py          # on a GPU
    python3 tests/gpu/switch_tokens.py --cpu    # on a CPU: split-K's summation emulated in PyTorch

A speed switch changes how or when kernels run.  Programmatic dependent launch (``nanovllm.triton_pdl.PDL``) changes
only when a kernel starts: the tokens should be the same, bit for bit.  o and down split along K
(``nanovllm.kernels.SPLITK_ADD_NORM``) sum the same products in another order: in bfloat16 a reply may part from the
unsplit one where the rounding flips a near-tie, and in float32 hardly ever.  For each setting of the two: the
replies to eight chat questions (the first, "What is the capital of France?", is chapter 00's, which asserts that
the reply names Paris and stops), asked alone and then in a batch of 16, and the index where each request's tokens
first part from the run with both switches off; then both on against both off in float32.  Exits 1 if, with both
on, the first reply parts from the all-off run's.

``--cpu`` (no GPU needed): the same questions on the CPU in bfloat16, the reference path against a model whose o
and down projections leave float32 parts that the RMSNorm after them sums, in PyTorch, with the split counts
``splitk_config`` picks (the kernels' summation order, not their code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from nanovllm import LLM, SamplingParams, triton_pdl  # noqa: E402
from nanovllm import kernels as nk  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Write a haiku about the sea.", "Who wrote Hamlet?", "Explain photosynthesis in one sentence.",
             "List the planets of the solar system.", "What is the boiling point of water in Celsius?"]


def ask(llm):
    params = SamplingParams(temperature=0, max_tokens=64)
    lone = llm.chat([{"role": "user", "content": QUESTIONS[0]}], params, use_tqdm=False)[0]
    return [lone] + llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS * 2], params, use_tqdm=False)


def replies(pdl, splitk, dtype=None):
    saved = triton_pdl.PDL, nk.SPLITK_ADD_NORM
    triton_pdl.PDL, nk.SPLITK_ADD_NORM = pdl, splitk
    try:
        llm = LLM(max_num_seqs=32, max_model_len=1024, **({"dtype": dtype} if dtype else {}))
        try:
            return ask(llm)
        finally:
            llm.shutdown()
    finally:
        triton_pdl.PDL, nk.SPLITK_ADD_NORM = saved


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def report(label, outs, base):
    parts = [first_difference(o.token_ids, b.token_ids) for o, b in zip(outs, base)]
    print(f"{label}: {repr(outs[0].text)[:90]} [{outs[0].finish_reason}]; requests equal to the baseline "
          f"{parts.count(None)}/{len(parts)}, first differences at {[p for p in parts if p is not None]}", flush=True)
    return parts


def cpu_replies(splitk: bool):
    """The embedded model on the CPU in bfloat16, eager; with ``splitk`` its o and down projections summed as the
    split-K kernels sum them (float32 parts over pieces of K a multiple of 128 long, then the sum rounded once)."""
    from nanovllm.engine import model_runner
    from nanovllm.kernels import Kernels
    from nanovllm.layers.linear import SplitK
    from nanovllm.layers.norm import add_rms_norm
    from nanovllm.layers.triton_gemm import splitk_config

    def parts(x, w):
        k = x.shape[1]
        s = splitk_config(x.shape[0], k)["splits"]
        per = (-(-k // s) + 127) // 128 * 128  # splitk_gemm: each split a multiple of its 128-wide K tiles
        return SplitK(torch.stack([x[:, i * per:(i + 1) * per].float() @ w[:, i * per:(i + 1) * per].float().T
                                   for i in range(s)]), x.dtype)

    def summed(y, residual, weight, eps):
        return add_rms_norm(y.total(), residual, weight, eps)

    kernels = Kernels(splitk_gemm=parts, sum_add_rms_norm=summed, splitk_max_rows=256) if splitk else Kernels()
    select = model_runner.select_kernels
    model_runner.select_kernels = lambda *a, **kw: kernels
    try:
        llm = LLM(device="cpu", dtype=torch.bfloat16, enforce_eager=True, max_num_seqs=32, max_model_len=1024)
    finally:
        model_runner.select_kernels = select
    try:
        return ask(llm)
    finally:
        llm.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="split-K's summation emulated on the CPU, bfloat16")
    args = ap.parse_args()
    if args.cpu:
        base = cpu_replies(False)
        report("CPU bfloat16, reference", base, base)
        report("CPU bfloat16, split-K summation", cpu_replies(True), base)
        return
    if not torch.cuda.is_available():
        sys.exit("switch_tokens.py needs a CUDA GPU (or --cpu)")
    base, bad = None, False
    for pdl, splitk in [(False, False), (True, False), (False, True), (True, True)]:
        outs = replies(pdl, splitk)
        base = base or outs
        parts = report(f"{torch.cuda.get_device_name(0)} bfloat16, PDL {pdl!s:5} split-K {splitk!s:5}", outs, base)
        if pdl and splitk and (parts[0] is not None or "Paris" not in outs[0].text):
            bad = True
    for o, q in zip(base[1:9], QUESTIONS):
        print(f"  both off: {q!r} -> {o.text[:100]!r}")
    ref = replies(False, False, "float32")
    report("float32, both off", ref, ref)
    report("float32, both on", replies(True, True, "float32"), ref)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
