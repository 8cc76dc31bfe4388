"""Figure for chapter 01: the decoder's data flow for a sequence of T tokens, with the shape of every tensor,
read from the model's config.json (by default the embedded SmolLM2-135M-Instruct that chapter 01 loads).

    python figures/fig_01_decoder.py [model_folder [out.png]]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

HERE = Path(__file__).resolve().parent
NORM, ATTN, MLP, IO = "#f9d9b0", "#c9d9ec", "#cfe8cf", "#eeeeee"


def read_config(folder: Path) -> dict:
    raw = json.loads((folder / "config.json").read_text())
    heads = raw["num_attention_heads"]
    return dict(name=re.sub(r"-[0-9a-f]{12}$", "", folder.name), layers=raw["num_hidden_layers"],
                hidden=raw["hidden_size"], heads=heads,
                kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, inter=raw["intermediate_size"],
                vocab=raw["vocab_size"], tied=bool(raw.get("tie_word_embeddings", False)))


def steps(c: dict) -> list[tuple[str, str, str, str]]:
    """(block, operation, output shape, colour) from the token ids to the logits; the layer's steps are marked."""
    d, h, kv, hd = c["hidden"], c["heads"], c["kv_heads"], c["head_dim"]
    return [
        ("in", "token ids", "[T]", IO),
        ("in", "embedding lookup" + (" (shares its matrix with the LM head)" if c["tied"] else ""), f"[T, {d}]",
         IO),
        ("layer", "RMSNorm", f"[T, {d}]", NORM),
        ("layer", "Q, K, V projections", f"q [T, {h}, {hd}]   k, v [T, {kv}, {hd}]", ATTN),
        ("layer", "RoPE: rotate q and k by position", f"q [T, {h}, {hd}]   k [T, {kv}, {hd}]", ATTN),
        ("layer", f"causal GQA attention ({h // kv} query heads per KV head)", f"[T, {h}, {hd}]", ATTN),
        ("layer", "O projection, + residual", f"[T, {d}]", ATTN),
        ("layer", "RMSNorm", f"[T, {d}]", NORM),
        ("layer", "gate and up projections", f"2 x [T, {c['inter']}]", MLP),
        ("layer", "SiLU(gate) * up", f"[T, {c['inter']}]", MLP),
        ("layer", "down projection, + residual", f"[T, {d}]", MLP),
        ("out", "final RMSNorm", f"[T, {d}]", NORM),
        ("out", "LM head: a score per vocabulary entry", f"[T, {c['vocab']}]", IO),
    ]


def main(folder: Path, out: Path) -> None:
    c = read_config(folder)
    rows = steps(c)
    n = len(rows)
    fig, ax = plt.subplots(figsize=(8.6, 0.52 * n + 0.9), dpi=120)
    ax.set_xlim(-0.1, 10)
    ax.set_ylim(-0.6, n - 0.35)
    ax.axis("off")
    y_of = {i: n - 1 - i for i in range(n)}
    layer = [i for i, r in enumerate(rows) if r[0] == "layer"]
    top, bottom = y_of[layer[0]] + 0.42, y_of[layer[-1]] - 0.42
    ax.add_patch(Rectangle((0.15, bottom), 9.7, top - bottom, facecolor="#fafafa", edgecolor="#888888", lw=1.0,
                           ls="--"))
    ax.text(9.75, top - 0.2, f"x {c['layers']} layers", ha="right", va="center", fontsize=10, weight="bold",
            color="#555555")
    bx, bw, bh = 0.5, 4.6, 0.62
    for i, (_, op, shape, color) in enumerate(rows):
        y = y_of[i]
        ax.add_patch(FancyBboxPatch((bx, y - bh / 2), bw, bh, boxstyle="round,pad=0.01,rounding_size=0.08",
                                    facecolor=color, edgecolor="#333333", lw=0.9))
        ax.text(bx + 0.12, y, op, va="center", fontsize=8.5)
        ax.text(bx + bw + 0.25, y, shape, va="center", fontsize=8.5, family="monospace")
        if i + 1 < n:
            ax.add_patch(FancyArrowPatch((bx + 1.2, y - bh / 2), (bx + 1.2, y - 1 + bh / 2), arrowstyle="-|>",
                                         mutation_scale=9, lw=0.9, color="#333333"))
    # the residual stream: carried around each half of the layer and added back at its end
    for start, end in ((layer[0], layer[4]), (layer[5], layer[8])):
        y0, y1 = y_of[start] + 0.5, y_of[end]
        ax.plot([bx + 1.2, 0.3, 0.3], [y0, y0, y1], color="#e15759", lw=1.1)
        ax.add_patch(FancyArrowPatch((0.3, y1), (bx, y1), arrowstyle="-|>", mutation_scale=9, lw=1.1,
                                     color="#e15759"))
    ax.text(0.16, (y_of[layer[0]] + y_of[layer[4]]) / 2, "residual", rotation=90, ha="right", va="center",
            fontsize=7.5, color="#e15759")
    ax.set_title(f"{c['name']}: one forward pass over T tokens ({c['hidden']} hidden, {c['heads']} query heads, "
                 f"{c['kv_heads']} KV heads of {c['head_dim']})", fontsize=9.5, loc="left")
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    print(f"wrote {out}")


def default_folder() -> Path:
    sys.path.insert(0, str(HERE.parent))
    from nanovllm.loading.embedded import embedded_model_dir

    return embedded_model_dir(progress=False)


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else default_folder()
    main(folder, Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "fig_01_decoder.png")
