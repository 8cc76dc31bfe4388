"""Write fig_06_next_token.json beside this file: SmolLM2's next-token distribution after a prompt, and what
each sampling setting of chapter 06 keeps of it.

Run by hand (about half a minute on a CPU)::

    python figures/data/next_token_distribution.py

The embedded SmolLM2-135M-Instruct, float32, on the CPU.  For each setting (temperature, top_k, top_p) the
file holds the number of tokens the setting keeps, the probability mass they held under the temperature-
scaled distribution, and, for the 20 most likely tokens, their probability before (temperature only) and
after the masks (renormalised), computed with nanovllm's own ``apply_top_k_top_p``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanovllm import LLM
from nanovllm.engine.sequence import ScheduledBatch, Sequence
from nanovllm.layers.sampler import apply_top_k_top_p

PROMPT = "My favourite fruit is"
SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.5, 0, 1.0),
    (1.5, 0, 1.0),
    (1.0, 10, 1.0),
    (1.0, 0, 0.9),
    (0.7, 50, 0.9),
]
SHOWN = 20
OUT = Path(__file__).resolve().parent / "fig_06_next_token.json"


def next_token_logits(llm: LLM, prompt: str) -> torch.Tensor:
    seq = Sequence(-1, llm.tokenizer(prompt).input_ids)
    llm.block_manager.allocate(seq)
    try:
        return llm.runner.logits(ScheduledBatch([seq], [seq.num_uncomputed_tokens], is_prefill=True))[0]
    finally:
        llm.block_manager.deallocate(seq)


def main() -> None:
    llm = LLM(device="cpu", dtype="float32", num_kvcache_blocks=16, enable_prefix_caching=False)
    logits = next_token_logits(llm, PROMPT)
    top = logits.topk(SHOWN).indices
    panels = []
    for temperature, top_k, top_p in SETTINGS:
        scaled = logits / temperature
        masked = apply_top_k_top_p(scaled[None], torch.tensor([top_k]), torch.tensor([top_p]))[0]
        kept = torch.isfinite(masked)
        before, after = scaled.softmax(-1), masked.softmax(-1)
        panels.append(dict(
            temperature=temperature, top_k=top_k, top_p=top_p,
            kept_tokens=int(kept.sum()), kept_mass=round(float(before[kept].double().sum()), 4),
            shown_before=[round(float(before[i]), 6) for i in top],
            shown_after=[round(float(after[i]), 6) for i in top],
        ))
    data = dict(
        comment="SmolLM2-135M-Instruct's next token after the prompt, under each sampling setting of chapter 06; "
                "written by figures/data/next_token_distribution.py, drawn by figures/fig_06_sampling.py.",
        prompt=PROMPT, vocab_size=int(logits.numel()),
        shown_tokens=[llm.tokenizer.decode([int(i)]) for i in top],
        shown_ids=[int(i) for i in top],
        panels=panels,
    )
    lines = [json.dumps({k: v for k, v in data.items() if k != "panels"}, ensure_ascii=False)[:-1] + ', "panels": [']
    lines += [" " + json.dumps(panel) + ("," if i < len(panels) - 1 else "") for i, panel in enumerate(panels)]
    OUT.write_text("\n".join(lines) + "\n]}\n")  # one line per setting
    print(f"wrote {OUT.name}: {len(panels)} settings, {SHOWN} tokens shown")


if __name__ == "__main__":
    main()
