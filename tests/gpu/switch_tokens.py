"""The embedded model's greedy replies on a GPU with each setting of the package's speed switches (not collected by
pytest; run on a GPU machine with the embedded model installed, e.g. through the GPU notes' env.sh):

    python3 tests/gpu/switch_tokens.py

A speed switch changes how or when kernels run; greedy tokens may part from the baseline's only where bfloat16
rounding flips a near-tie, never wholesale.  For each setting of programmatic dependent launch
(``nanovllm.triton_pdl.PDL``) and o and down split along K (``nanovllm.kernels.SPLITK_ADD_NORM``): the reply to
"What is the capital of France?" (chapter 00 asserts it names Paris and stops), then the replies to a batch of
chat questions, and the index where each request's tokens first part from the run with both switches off.
Then the defaults against all off in float32, where a near-tie is far rarer.  Exits 1 if the package's defaults
part from the all-off run on that first reply.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from nanovllm import LLM, SamplingParams, triton_pdl  # noqa: E402
from nanovllm import kernels as nk  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Write a haiku about the sea.", "Who wrote Hamlet?", "Explain photosynthesis in one sentence.",
             "List the planets of the solar system.", "What is the boiling point of water in Celsius?"]


def replies(pdl, splitk, dtype=None):
    saved = triton_pdl.PDL, nk.SPLITK_ADD_NORM
    triton_pdl.PDL, nk.SPLITK_ADD_NORM = pdl, splitk
    try:
        llm = LLM(max_num_seqs=32, max_model_len=1024, **({"dtype": dtype} if dtype else {}))
        try:
            params = SamplingParams(temperature=0, max_tokens=64)
            lone = llm.chat([{"role": "user", "content": QUESTIONS[0]}], params, use_tqdm=False)[0]
            batch = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS * 2], params, use_tqdm=False)
            return [lone] + batch
        finally:
            llm.shutdown()
    finally:
        triton_pdl.PDL, nk.SPLITK_ADD_NORM = saved


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main():
    default = (triton_pdl.PDL, nk.SPLITK_ADD_NORM)
    settings = [(False, False), (True, False), (False, True), (True, True)]
    base = None
    bad = False
    for s in settings:
        outs = replies(*s)
        if base is None:
            base = outs
        parts = [first_difference(o.token_ids, b.token_ids) for o, b in zip(outs, base)]
        tag = " (the package's defaults)" if s == default else ""
        print(f"PDL {s[0]!s:5} split-K {s[1]!s:5}{tag}: {repr(outs[0].text)[:90]} "
              f"[{outs[0].finish_reason}]; requests equal to all-off {parts.count(None)}/{len(parts)}, "
              f"first differences at {[p for p in parts if p is not None]}", flush=True)
        if s == default and (parts[0] is not None or "Paris" not in outs[0].text):
            bad = True
    for o, q in zip(base[1:9], QUESTIONS):
        print(f"  all off: {q!r} -> {o.text[:100]!r}")
    # in float32 a near-tie is far rarer: every request's tokens should be the all-off run's
    ref, fast = replies(False, False, "float32"), replies(*default, "float32")
    parts = [first_difference(o.token_ids, b.token_ids) for o, b in zip(fast, ref)]
    print(f"float32, the defaults against all off: requests equal {parts.count(None)}/{len(parts)}, "
          f"first differences at {[p for p in parts if p is not None]}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
