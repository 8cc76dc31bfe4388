"""Figure for chapter 13: tokens a verify step emits on average against the number of drafts k, if each draft is
accepted independently with probability alpha ((1 - alpha^(k+1)) / (1 - alpha), Leviathan et al. 2023), with
the tokens per verify step measured on the embedded SmolLM2 (greedy; a repetitive chat workload).
Data: figures/data/fig_13_speculative.json (measured points: method, k, acceptance, tokens per step, where)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def expected_tokens(alpha: float, k: int) -> float:
    return k + 1 if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def main():
    data = json.loads((HERE / "data" / "fig_13_speculative.json").read_text())
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ks = list(range(0, 9))
    for alpha in (0.3, 0.5, 0.7, 0.8, 0.9, 1.0):
        ax.plot(ks, [expected_tokens(alpha, k) for k in ks], color="#bab0ac", lw=1)
        ax.text(ks[-1] + 0.1, expected_tokens(alpha, ks[-1]), f"α = {alpha:g}", fontsize=7, va="center")
    markers = {"ngram": ("o", "#4e79a7"), "draft": ("s", "#f28e2b")}
    for p in data["points"]:
        marker, color = markers[p["method"]]
        ax.scatter(p["k"], p["tokens_per_step"], marker=marker, color=color, zorder=3)
        ax.annotate(f"{p['label']} (acceptance {p['acceptance']:.0%})", (p["k"], p["tokens_per_step"]),
                    textcoords="offset points", xytext=(6, -10), fontsize=7, color=color)
    ax.set_xlabel("drafts per verify step (k)")
    ax.set_ylabel("tokens per verify step")
    ax.set_title(f"Tokens per verify step: theory (grey, per-draft acceptance α) and measured\n{data['where']}",
                 fontsize=8)
    ax.set_xlim(0, ks[-1] + 1.2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "fig_13_speculative.png")


if __name__ == "__main__":
    main()
