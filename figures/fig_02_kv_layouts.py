"""Figure for chapter 02: one moment of a 40-slot KV cache under three layouts (contiguous regions of
max_model_len, contiguous regions of the exact final length, paged blocks).
Data: figures/data/fig_02_kv_layouts.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
DARK = {"A": "#4e79a7", "C": "#59a14f", "D": "#f28e2b"}
LIGHT = {"A": "#c6d4e6", "C": "#cfe5c9", "D": "#fbd9b5"}


def draw_slots(ax, y, owners, tokens, block_size=None):
    """owners: one entry per slot (a request name or None); the first tokens[name] slots of a request
    hold tokens, the rest of its slots are reserved but empty."""
    seen = {}
    for x, owner in enumerate(owners):
        if owner is None:
            face, hatch = "white", None
        else:
            seen[owner] = seen.get(owner, 0) + 1
            face = DARK[owner] if seen[owner] <= tokens[owner] else LIGHT[owner]
            hatch = None
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=face, edgecolor="#999999", lw=0.5, hatch=hatch))
    # outline each owner's run (or each block)
    start = 0
    for x in range(1, len(owners) + 1):
        boundary = x == len(owners) or owners[x] != owners[start] or (block_size and x % block_size == 0)
        if boundary:
            label = owners[start]
            ax.add_patch(Rectangle((start, y), x - start, 1, fill=False, edgecolor="black", lw=1.3))
            if label is not None:
                ax.text((start + x) / 2, y + 1.25, label, ha="center", fontsize=9, weight="bold",
                        color=DARK[label])
            start = x


def main():
    data = json.loads((HERE / "data" / "fig_02_kv_layouts.json").read_text())
    cap, bs, tokens = data["capacity"], data["block_size"], data["tokens"]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    for row, layout in enumerate(data["layouts"]):
        y = (len(data["layouts"]) - 1 - row) * 3.0
        if "blocks" in layout:
            owners = [b for b in layout["blocks"] for _ in range(bs)]
            draw_slots(ax, y, owners, tokens, block_size=bs)
        else:
            owners = [None] * cap
            for name, start, size in layout["segments"]:
                for x in range(start, start + size):
                    owners[x] = name
            draw_slots(ax, y, owners, tokens)
        ax.text(0, y + 1.95, layout["title"], fontsize=10, weight="bold")
        ax.text(cap + 0.6, y + 0.5, layout["note"], fontsize=8.5, va="center", wrap=True)
    ax.set_xlim(-0.5, cap + 19)
    ax.set_ylim(-0.8, 3.0 * len(data["layouts"]))
    ax.axis("off")
    handles = [Patch(facecolor="#777777", label="slot holding a token's K/V"),
               Patch(facecolor="#dddddd", label="reserved, still empty"),
               Patch(facecolor="white", edgecolor="#999999", label="free")]
    ax.legend(handles=handles, loc="lower right", fontsize=8, frameon=False, ncol=3)
    fig.tight_layout()
    fig.savefig(HERE / "fig_02_kv_layouts.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
