"""Figure for chapter 06: SmolLM2's next-token distribution after "My favourite fruit is", under six sampling
settings (temperature, top-k, top-p).  Each panel shows the 20 most likely tokens: the probability a token
has under the setting (blue; renormalised over the kept tokens), a hollow grey bar where a mask dropped it
(its probability before the mask), and one last bar for the rest of the 49,152-token vocabulary.
Data: figures/data/fig_06_next_token.json, written by figures/data/next_token_distribution.py."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
KEPT, DROPPED, REST = "#4e79a7", "#bab0ac", "#f28e2b"


def title(panel: dict, vocab: int) -> str:
    parts = [f"T = {panel['temperature']:g}"]
    if panel["top_k"] > 0:
        parts.append(f"top-k {panel['top_k']}")
    if panel["top_p"] < 1:
        parts.append(f"top-p {panel['top_p']:g}")
    kept = panel["kept_tokens"]
    if kept == vocab:
        return ", ".join(parts) + ": every token kept"
    return ", ".join(parts) + f": {kept:,} tokens kept, {panel['kept_mass']:.0%} of the mass"


def main():
    data = json.loads((HERE / "data" / "fig_06_next_token.json").read_text())
    labels = [t.strip() or repr(t) for t in data["shown_tokens"]]
    n, vocab = len(labels), data["vocab_size"]
    panels = data["panels"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.2), dpi=120, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        before, after = panel["shown_before"], panel["shown_after"]
        for i, (b, a) in enumerate(zip(before, after)):
            if a > 0:
                ax.bar(i, a, color=KEPT, width=0.8)
            else:
                ax.bar(i, b, facecolor="none", edgecolor=DROPPED, hatch="///", width=0.8, lw=0.8)
        rest = max(1 - sum(after), 0.0)
        ax.bar(n + 0.5, rest, color=REST, width=0.8)
        ax.text(n + 0.5, rest + 0.01, f"{rest:.0%}", ha="center", fontsize=7)
        ax.set_xticks(list(range(n)) + [n + 0.5], labels + [f"other {vocab - n:,}"], rotation=90, fontsize=7)
        ax.set_title(title(panel, vocab), fontsize=9, loc="left")
        ax.grid(axis="y", color="#dddddd", lw=0.5)
        ax.set_axisbelow(True)
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    handles = [plt.Rectangle((0, 0), 1, 1, color=KEPT), plt.Rectangle((0, 0), 1, 1, fc="none", ec=DROPPED,
                                                                       hatch="///"),
               plt.Rectangle((0, 0), 1, 1, color=REST)]
    fig.legend(handles, ["kept (probability after the setting)", "dropped by the mask", "all other tokens"],
               loc="upper right", fontsize=8, ncol=3)
    fig.suptitle(f"SmolLM2-135M-Instruct, next token after {data['prompt']!r}", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(HERE / "fig_06_sampling.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
