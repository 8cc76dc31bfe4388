"""Figure for chapter 09: how tensor parallelism splits a linear layer, and one decoder layer, over two ranks.

Left: a column-parallel layer (W split by output rows: each rank computes a slice of y) and a row-parallel
layer (W split by input columns: each rank computes a full-sized partial sum, and an all-reduce adds them).
Right: one decoder layer of Qwen3-0.6B over two ranks, with the sizes read from the package's copy of its
config (nanovllm/configs/qwen3-0.6b.json): attention split by heads, the MLP by intermediate features, and
the two all-reduces per layer.

    python figures/fig_09_sharding.py [output.png]      # default: figures/fig_09_sharding.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "nanovllm" / "configs" / "qwen3-0.6b.json"
RANK = ["#4e79a7", "#f28e2b"]  # rank 0, rank 1
WHOLE, REDUCE = "#bab0ac", "#e15759"
TP = 2


def box(ax, x, y, w, h, color, text="", fontsize=7, textcolor="white", alpha=1.0):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="white", lw=1, alpha=alpha))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=textcolor)


def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="#555555", lw=0.8))


def column_parallel(ax):
    """x [1, in] times W.T, W [out, in] cut by rows: rank r holds rows r*out/2.., computes y[:, its slice]."""
    ax.set_title("column-parallel: W split by output features", fontsize=9, loc="left")
    box(ax, 0.0, 2.2, 2.0, 0.35, WHOLE, "x (whole, on every rank)", textcolor="black")
    for r in range(TP):  # W: [out, in], drawn with out vertical
        box(ax, 2.6, 2.9 - 1.2 * r, 2.0, 1.2, RANK[r], f"rank {r}: {('W[:out/2]', 'W[out/2:]')[r]}")
    arrow(ax, 2.0, 2.37, 2.6, 2.37)
    for r in range(TP):  # y: [1, out], its halves
        box(ax, 5.3 + 0.6 * r, 2.2, 0.6, 0.35, RANK[r], f"y{r}")
    arrow(ax, 4.6, 2.37, 5.3, 2.37)
    ax.text(6.3, 1.7, "y = [y0 | y1]: an all-gather,\nor kept split for a row-parallel layer", ha="right",
            va="top", fontsize=7)
    ax.set_xlim(-0.1, 6.6)
    ax.set_ylim(0.4, 4.3)


def row_parallel(ax):
    """x cut by features; W cut by columns; each rank a full-sized partial sum; the all-reduce adds them."""
    ax.set_title("row-parallel: W split by input features", fontsize=9, loc="left")
    for r in range(TP):
        box(ax, 1.0 * r, 2.2, 1.0, 0.35, RANK[r], f"x{r}")
        box(ax, 2.6 + 1.0 * r, 1.8, 1.0, 1.2, RANK[r], f"rank {r}:\n{('W[:, :in/2]', 'W[:, in/2:]')[r]}")
        box(ax, 5.3, 3.0 - 0.55 * r, 1.2, 0.35, RANK[r], f"partial {r}")
    arrow(ax, 2.0, 2.37, 2.6, 2.37)
    arrow(ax, 4.6, 2.5, 5.3, 3.15)
    arrow(ax, 4.6, 2.3, 5.3, 2.6)
    arrow(ax, 5.9, 2.45, 5.9, 1.7)
    arrow(ax, 5.9, 1.35, 5.9, 1.1)
    box(ax, 5.3, 1.35, 1.2, 0.35, REDUCE, "all-reduce: +")
    box(ax, 5.3, 0.75, 1.2, 0.35, WHOLE, "y (every rank)", textcolor="black")
    ax.text(0.0, 1.4, "rank 0 adds the bias,\nonce", fontsize=7, va="top")
    ax.set_xlim(-0.1, 6.6)
    ax.set_ylim(0.4, 4.3)


def decoder_layer(ax, cfg):
    """One layer over TP ranks: the sizes each rank holds, and where the all-reduces sit."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, inter = cfg.get("head_dim") or h // heads, cfg["intermediate_size"]
    qh, kvh, ih = heads // TP, kv // TP, inter // TP
    rows = [  # (label for rank r, kind)
        (lambda r: f"hidden states [tokens, {h}]", "whole"),
        (lambda r: f"qkv_proj: query heads {r * qh}-{(r + 1) * qh - 1}, KV heads {r * kvh}-{(r + 1) * kvh - 1}\n"
                   f"[{qh * d} + {kvh * d} + {kvh * d}, {h}]", "rank"),
        (lambda r: f"attention over its {qh} heads (cache: its {kvh} KV heads)", "rank"),
        (lambda r: f"o_proj: its heads' columns [{h}, {qh * d}]", "rank"),
        (lambda r: f"all-reduce of [tokens, {h}]", "reduce"),
        (lambda r: f"gate_up_proj: intermediate features {r * ih}-{(r + 1) * ih - 1}\n"
                   f"[2 x {ih}, {h}]", "rank"),
        (lambda r: f"silu(gate) * up: [tokens, {ih}], no communication", "rank"),
        (lambda r: f"down_proj: its columns [{h}, {ih}]", "rank"),
        (lambda r: f"all-reduce of [tokens, {h}]", "reduce"),
    ]
    ax.set_title(f"one Qwen3-0.6B layer over {TP} ranks ({heads} query heads, {kv} KV heads, "
                 f"intermediate {inter})", fontsize=9, loc="left")
    col_w, gap, row_h, step = 4.6, 0.3, 0.62, 0.8
    for i, (label, kind) in enumerate(rows):
        y = (len(rows) - 1 - i) * step
        if kind == "reduce":
            box(ax, 0, y, TP * col_w + gap, row_h, REDUCE, label(0), fontsize=7.5)
        elif kind == "whole":
            for r in range(TP):
                box(ax, r * (col_w + gap), y, col_w, row_h, WHOLE, label(r), textcolor="black")
        else:
            for r in range(TP):
                box(ax, r * (col_w + gap), y, col_w, row_h, RANK[r], label(r), fontsize=6.5)
        if i:
            for r in range(TP):
                cx = r * (col_w + gap) + col_w / 2
                arrow(ax, cx, y + step, cx, y + row_h)
    for r in range(TP):
        ax.text(r * (col_w + gap) + col_w / 2, len(rows) * step - 0.05, f"rank {r}", ha="center",
                fontsize=8, color=RANK[r], weight="bold")
    ax.text(0, -0.35, "RMSNorm, RoPE and the residual additions run on every rank on the full hidden states.",
            fontsize=7, va="top")
    ax.set_xlim(-0.1, TP * col_w + gap + 0.1)
    ax.set_ylim(-0.7, len(rows) * step + 0.2)


def main(out: Path) -> None:
    cfg = json.loads(CONFIG.read_text())
    fig = plt.figure(figsize=(12, 5.6), dpi=120)
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.45])
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[:, 1])]
    column_parallel(axes[0])
    row_parallel(axes[1])
    decoder_layer(axes[2], cfg)
    for ax in axes:
        ax.set_axis_off()
    handles = [FancyBboxPatch((0, 0), 1, 1, color=c) for c in (*RANK, WHOLE, REDUCE)]
    fig.legend(handles, ["rank 0", "rank 1", "the same on every rank", "all-reduce"], loc="lower left",
               ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, metadata={"Software": None})


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "fig_09_sharding.png")
