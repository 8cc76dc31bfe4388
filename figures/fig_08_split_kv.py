"""Figure for chapter 08: how nanovllm's split-KV decode kernel reads one sequence.  Top: the sequence's
logical blocks (its tokens, cut into tiles of BLOCK_N tokens, each tile coloured by the split that reads it)
and, below them, the physical blocks of the cache they map to through the block table.  Bottom: one program
per (sequence, KV head, split) computes a partial result and its log-sum-exp; a second kernel merges them.
Data: figures/data/fig_08_split_kv.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
SPLIT_COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"]
W = 0.5  # drawn width of one block


def main():
    d = json.loads((HERE / "data" / "fig_08_split_kv.json").read_text())
    bs, ctx, block_n, splits = d["block_size"], d["context_len"], d["block_n"], d["num_splits"]
    table, num_blocks = d["block_table"], d["num_blocks"]
    num_tiles = -(-ctx // block_n)
    per_split = -(-num_tiles // splits)

    def split_of(pos):
        return (pos // block_n) // per_split

    fig = plt.figure(figsize=(11, 6.2), dpi=120)
    ax = fig.add_axes((0.02, 0.40, 0.96, 0.53))
    ax2 = fig.add_axes((0.02, 0.02, 0.96, 0.36))

    # logical blocks of the sequence
    x0 = (num_blocks - len(table)) * W / 2
    y_log, y_phys = 3.0, 0.0
    for i, phys in enumerate(table):
        first = i * bs
        filled = min(bs, ctx - first)
        color = SPLIT_COLORS[split_of(first)]
        x = x0 + i * W
        ax.add_patch(Rectangle((x, y_log), W * filled / bs, 0.6, color=color))
        ax.add_patch(Rectangle((x, y_log), W, 0.6, fill=False, ec="black", lw=0.8))
        ink = "white" if filled == bs else "black"
        ax.text(x + W / 2, y_log + 0.3, str(i), ha="center", va="center", fontsize=7, color=ink)
        # its physical block
        px = phys * W
        ax.add_patch(Rectangle((px, y_phys), W * filled / bs, 0.6, color=color))
        ax.plot([x + W / 2, px + W / 2], [y_log, y_phys + 0.6], color=color, lw=0.8, alpha=0.8)
        ax.text(px + W / 2, y_phys + 0.3, str(phys), ha="center", va="center", fontsize=7, color=ink)
    for b in range(num_blocks):
        ax.add_patch(Rectangle((b * W, y_phys), W, 0.6, fill=False, ec="#999999", lw=0.6))
    # tiles above the logical row
    for t in range(num_tiles):
        start, end = t * block_n, min((t + 1) * block_n, ctx)
        xa, xb = x0 + start / bs * W, x0 + end / bs * W
        ax.plot([xa + 0.02, xb - 0.02], [y_log + 0.8] * 2, color=SPLIT_COLORS[split_of(start)], lw=3)
        ax.text((xa + xb) / 2, y_log + 0.95, f"tile {t}", ha="center", fontsize=7)
    ax.text(x0 - 0.15, y_log + 0.3, f"logical blocks\n({ctx} tokens)", ha="right", va="center", fontsize=8)
    ax.text(-0.15, y_phys + 0.3, "KV cache\n(physical blocks)", ha="right", va="center", fontsize=8)
    ax.text(x0 + len(table) * W + 0.2, y_log + 0.95, f"tiles of BLOCK_N = {block_n} tokens", fontsize=8,
            va="center")
    ax.text(x0 + len(table) * W / 2, (y_log + y_phys + 0.6) / 2, "block table", fontsize=8, ha="center",
            va="center", bbox=dict(fc="white", ec="none", alpha=0.8))
    ax.set_xlim(-2.2, num_blocks * W + 0.3)
    ax.set_ylim(-0.3, 4.3)
    ax.axis("off")
    ax.set_title(f"one sequence, block size {bs}: {num_tiles} tiles shared out among {splits} splits",
                 fontsize=10, loc="left")

    # programs and the merge
    for s in range(splits):
        tiles = [t for t in range(num_tiles) if t // per_split == s]
        lo, hi = tiles[0] * block_n, min((tiles[-1] + 1) * block_n, ctx) - 1
        y = 2.2 - s * 1.0
        box = FancyBboxPatch((0.2, y), 4.6, 0.7, boxstyle="round,pad=0.05", fc=SPLIT_COLORS[s], ec="none")
        ax2.add_patch(box)
        which = f"tile {tiles[0]}" if len(tiles) == 1 else f"tiles {tiles[0]}-{tiles[-1]}"
        ax2.text(2.5, y + 0.35, f"program (seq, kv head, split {s}): {which}, tokens {lo}-{hi}",
                 ha="center", va="center", fontsize=8, color="white")
        ax2.annotate("", xy=(6.0, y + 0.35), xytext=(4.9, y + 0.35), arrowprops=dict(arrowstyle="->", lw=0.8))
        ax2.text(6.1, y + 0.35, f"o{s}, lse{s}", va="center", fontsize=9)
        ax2.annotate("", xy=(8.0, 1.55), xytext=(7.0, y + 0.35), arrowprops=dict(arrowstyle="->", lw=0.8))
    merge = FancyBboxPatch((8.1, 1.2), 3.2, 0.7, boxstyle="round,pad=0.05", fc="#eeeeee", ec="#999999")
    ax2.add_patch(merge)
    ax2.text(9.7, 1.55, "merge kernel:\nout = sum_s softmax(lse)_s * o_s", ha="center", va="center", fontsize=8)
    ax2.text(0.2, 3.15, "each program: the query heads of one KV head (a GQA group) against its tiles, "
             "online softmax; o = partial output, lse = log-sum-exp of its scores", fontsize=8)
    ax2.set_xlim(0, 12)
    ax2.set_ylim(-0.1, 3.4)
    ax2.axis("off")
    fig.savefig(HERE / "fig_08_split_kv.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
