"""Figure for chapter 11: the steps of nanovllm's scheduler with and without mixed batches (Sarathi-Serve's
stall-free batching), for two requests that are generating when a 40-token prompt arrives, with a budget of
16 tokens per step.  Data: a dry run of nanovllm's own Scheduler (no model; every sampled token is 0).

Without mixed batches the prompt's three prefill chunks run alone and the two generating requests get no
token for three steps; with mixed batches every step carries both decodes and a 14-token chunk.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from nanovllm.config import EngineConfig  # noqa: E402
from nanovllm.engine.block_manager import BlockManager  # noqa: E402
from nanovllm.engine.scheduler import Scheduler  # noqa: E402
from nanovllm.engine.sequence import Sequence  # noqa: E402
from nanovllm.sampling_params import SamplingParams  # noqa: E402

PREFILL, DECODE = "#f28e2b", "#4e79a7"
BUDGET, ARRIVAL = 16, 2  # tokens per step; the long prompt arrives before this step (0-based)
REQUESTS = [("A", 5, 10), ("B", 6, 10), ("C: 40-token prompt", 40, 4)]  # (name, prompt tokens, max_tokens)


def dry_run(mixed: bool) -> list[dict[int, tuple[str, int]]]:
    """Per step: {request: ("prefill" | "decode", tokens computed)}."""
    sched = Scheduler(EngineConfig(max_num_batched_tokens=BUDGET, mixed_batches=mixed), BlockManager(64, 4))
    seqs = [Sequence(i, [100 + i] * p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (_, p, m) in enumerate(REQUESTS)]
    for seq in seqs[:2]:
        sched.add(seq)
    steps = []
    while sched.has_unfinished() or len(steps) < ARRIVAL:
        if len(steps) == ARRIVAL:
            sched.add(seqs[2])
        batch = sched.schedule()
        step = {}
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            kind = "prefill" if s.num_computed_tokens + n <= s.num_prompt_tokens else "decode"
            step[s.seq_id] = (kind, n)
        steps.append(step)
        sched.postprocess(batch, [0] * sum(batch.samples(i) for i in range(len(batch.seqs))))
    return steps


def draw(ax, steps, title, xmax):
    for t, step in enumerate(steps):
        for r, (kind, n) in step.items():
            color = PREFILL if kind == "prefill" else DECODE
            ax.add_patch(plt.Rectangle((t, r - 0.38), 1, 0.76, facecolor=color, edgecolor="white", lw=1))
            if kind == "prefill":
                ax.text(t + 0.5, r, str(n), ha="center", va="center", fontsize=7, color="white")
    ax.axvline(ARRIVAL, color="#e15759", lw=1, ls="--")
    ax.text(ARRIVAL + 0.1, -0.55, "C arrives", fontsize=7, color="#e15759", va="bottom")
    ax.set_xlim(0, xmax)
    ax.set_ylim(len(REQUESTS) - 0.5, -0.9)
    ax.set_yticks(range(len(REQUESTS)), [name for name, _, _ in REQUESTS])
    ax.set_xticks(range(0, xmax + 1, 2))
    ax.set_title(f"{title}: {len(steps)} steps", fontsize=10, loc="left")
    ax.grid(axis="x", color="#dddddd", lw=0.5)
    ax.set_axisbelow(True)


def main():
    plain, mixed = dry_run(False), dry_run(True)
    xmax = max(len(plain), len(mixed)) + 1
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 3.8), dpi=120, sharex=True)
    draw(ax1, plain, "prefill or decode: A and B stall while C's prompt is read", xmax)
    draw(ax2, mixed, "mixed batches: every step carries A's and B's decodes and a chunk of C", xmax)
    ax2.set_xlabel(f"engine step  (a budget of {BUDGET} tokens per step; numbers: prompt tokens computed)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (PREFILL, DECODE)]
    ax1.legend(handles, ["prefill chunk", "decode (1 token)"], loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(HERE / "fig_11_mixed_batches.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
