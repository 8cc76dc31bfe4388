"""Figure for chapter 04: chained block hashes.  Each full block's hash covers the previous block's hash and
its own tokens, so two prompts have equal hashes exactly as far as their prefixes agree; the blocks with equal
hashes are stored once and shared.  Hashes are nanovllm's own (xxh64 via block_manager.block_hash).
Data: figures/data/fig_04_hash_chain.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

from nanovllm.engine.block_manager import block_hash  # noqa: E402

HERE = Path(__file__).resolve().parent
COLORS = ["#4e79a7", "#f28e2b"]
SHARED = "#76b7b2"


def main():
    data = json.loads((HERE / "data" / "fig_04_hash_chain.json").read_text())
    bs, prompts = data["block_size"], data["prompts"]
    vocab = {w: i for i, w in enumerate(sorted({w for p in prompts for w in p["words"]}))}
    chains = []
    for p in prompts:
        ids = [vocab[w] for w in p["words"]]
        hashes, h = [], None
        for i in range(len(ids) // bs):
            h = block_hash(ids[i * bs:(i + 1) * bs], h)
            hashes.append(h)
        chains.append(hashes)
    fig, ax = plt.subplots(figsize=(10, 3.4), dpi=120)
    ax.axis("off")
    ax.set_xlim(-2.6, 17.2)
    ax.set_ylim(-1.0, 4.3)
    bw = bs * 0.95 + 0.4  # width of one block in the picture
    for r, (p, hashes) in enumerate(zip(prompts, chains)):
        y = 3.3 - r * 2.1
        ax.text(-2.5, y + 0.35, p["name"], fontsize=10, weight="bold", color=COLORS[r], va="center")
        for i in range(-(-len(p["words"]) // bs)):
            x0 = i * bw
            full = i < len(hashes)
            shared = full and all(i < len(c) and c[i] == hashes[i] for c in chains)
            edge = "black" if full else "#999999"
            for k in range(bs):
                pos = i * bs + k
                word = p["words"][pos] if pos < len(p["words"]) else ""
                face = SHARED if shared else (COLORS[r] if word else "white")
                ax.add_patch(Rectangle((x0 + k * 0.95, y), 0.95, 0.7, facecolor=face, edgecolor="#555555", lw=0.5))
                ax.text(x0 + k * 0.95 + 0.475, y + 0.35, word, ha="center", va="center", fontsize=7, color="white")
            ax.add_patch(Rectangle((x0, y), bs * 0.95, 0.7, fill=False, edgecolor=edge, lw=1.3,
                                   ls="-" if full else "--"))
            if full:
                label = f"h{i} = H(h{i - 1}, tokens)" if i else "h0 = H(tokens)"
                ax.text(x0 + bs * 0.95 / 2, y - 0.35, f"{label}\n{hashes[i]:016x}"[:40],
                        ha="center", va="center", fontsize=6.5, family="monospace")
                if i:
                    ax.add_patch(FancyArrowPatch((x0 - 0.4, y + 0.35), (x0 - 0.02, y + 0.35), arrowstyle="-|>",
                                                 mutation_scale=8, color="black", lw=0.8))
            else:
                ax.text(x0 + bs * 0.95 / 2, y - 0.35, "partial: no hash yet",
                        ha="center", va="center", fontsize=6.5, color="#777777")
    ax.text(-2.5, -0.6, "blocks 0 and 1: same tokens, same hashes -> stored once, shared (ref count 2)\n"
            "block 2: tokens differ -> different hash, and so would every later block be, even with equal tokens",
            fontsize=8, color="#333333", va="center")
    fig.tight_layout()
    fig.savefig(HERE / "fig_04_hash_chain.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
