"""Figure for chapter 03: block tables map each sequence's logical blocks to physical blocks of the cache,
and a token's slot is block_table[pos // block_size] * block_size + pos % block_size.
Data: figures/data/fig_03_block_table.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
COLORS = ["#4e79a7", "#f28e2b"]


def main():
    data = json.loads((HERE / "data" / "fig_03_block_table.json").read_text())
    bs, nblocks, seqs = data["block_size"], data["num_blocks"], data["seqs"]
    fig, ax = plt.subplots(figsize=(10, 4.6), dpi=120)
    ax.set_xlim(-0.5, 42)
    ax.set_ylim(-1.7, 8.0)
    ax.axis("off")
    slot_w = 1.0
    cache_y = 0.0
    owner = {}
    for s, seq in enumerate(seqs):
        for j, b in enumerate(seq["block_table"]):
            owner[b] = (s, j)
    # physical cache: nblocks blocks of bs slots
    ax.text(-0.4, cache_y + 1.75, "KV cache (physical blocks)", fontsize=10, weight="bold")
    for b in range(nblocks):
        x0 = b * (bs * slot_w + 0.2)
        s_j = owner.get(b)
        for k in range(bs):
            filled = False
            if s_j is not None:
                s, j = s_j
                filled = j * bs + k < len(seqs[s]["tokens"])
            face = COLORS[s_j[0]] if filled else ("#dbe4f0" if s_j is not None and s_j[0] == 0 else
                                                  "#fbe3cc" if s_j is not None else "#eeeeee")
            ax.add_patch(Rectangle((x0 + k * slot_w, cache_y), slot_w, 1, facecolor=face, edgecolor="#555555",
                                   lw=0.6))
            ax.text(x0 + k * slot_w + 0.5, cache_y - 0.3, str(b * bs + k), ha="center", fontsize=6, color="#666666")
        ax.add_patch(Rectangle((x0, cache_y), bs * slot_w, 1, fill=False, edgecolor="black", lw=1.4))
        ax.text(x0 + bs * slot_w / 2, cache_y + 1.1, f"block {b}", ha="center", fontsize=8)
    ax.text(-0.4, cache_y - 0.95, "slot numbers", fontsize=7, color="#666666")
    # logical view of each sequence
    for s, seq in enumerate(seqs):
        y = 6.2 - s * 2.6
        ax.text(-0.4, y + 1.35, f"sequence {seq['name']}: block table {seq['block_table']}", fontsize=10,
                weight="bold", color=COLORS[s])
        x_base = 0.0 if s == 0 else 22.0
        ax.texts[-1].set_x(x_base - 0.4)
        for j, b in enumerate(seq["block_table"]):
            x0 = x_base + j * (bs * slot_w + 0.2)
            for k in range(bs):
                pos = j * bs + k
                tok = seq["tokens"][pos] if pos < len(seq["tokens"]) else ""
                face = COLORS[s] if tok else "white"
                ax.add_patch(Rectangle((x0 + k * slot_w, y), slot_w, 1, facecolor=face, edgecolor="#555555",
                                       lw=0.6))
                ax.text(x0 + k * slot_w + 0.5, y + 0.5, tok, ha="center", va="center", fontsize=7,
                        color="white")
                ax.text(x0 + k * slot_w + 0.5, y - 0.3, str(pos), ha="center", fontsize=6, color="#666666")
            ax.add_patch(Rectangle((x0, y), bs * slot_w, 1, fill=False, edgecolor="black", lw=1.4))
            dst = b * (bs * slot_w + 0.2) + bs * slot_w / 2
            ax.add_patch(FancyArrowPatch((x0 + bs * slot_w / 2, y - 0.45), (dst, cache_y + 1.45),
                                         arrowstyle="-|>", mutation_scale=10, color=COLORS[s], lw=1.1,
                                         alpha=0.8))
    h = data["highlight"]
    seq = next(q for q in seqs if q["name"] == h["seq"])
    pos = h["position"]
    table = seq["block_table"]
    slot = table[pos // bs] * bs + pos % bs
    ax.text(0, -1.5, f"token {pos} of {seq['name']} ({seq['tokens'][pos]!r}): slot = block_table[{pos} // {bs}] * {bs}"
            f" + {pos} % {bs} = {table[pos // bs]} * {bs} + {pos % bs} = {slot}", fontsize=9)
    b = slot // bs
    x = b * (bs * slot_w + 0.2) + (slot % bs) * slot_w
    ax.add_patch(Rectangle((x, cache_y), slot_w, 1, fill=False, edgecolor="#e15759", lw=2.5))
    fig.tight_layout()
    fig.savefig(HERE / "fig_03_block_table.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
