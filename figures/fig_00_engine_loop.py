"""Figure for chapter 00: the engine loop, one step at a time.  Requests wait in the scheduler; each step
the scheduler picks a batch (the block manager gives it KV blocks), the model runner turns it into tensors
and runs the model, the sampler picks one token per sequence, and the scheduler's postprocess appends them,
checks the stop conditions and frees what finished.

The boxes name the package's own classes and methods: the script reads them from nanovllm's source (without
importing torch) and fails if one no longer exists, so the picture cannot drift from the code.

    python figures/fig_00_engine_loop.py [out.png]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "nanovllm"

# (file, class, method or None): what each box stands for
PIECES = {
    "llm": ("llm.py", "LLM", "step"),
    "schedule": ("engine/scheduler.py", "Scheduler", "schedule"),
    "blocks": ("engine/block_manager.py", "BlockManager", "allocate"),
    "run": ("engine/model_runner.py", "ModelRunner", "run"),
    "sample": ("layers/sampler.py", "Sampler", None),
    "post": ("engine/scheduler.py", "Scheduler", "postprocess"),
}


def defined(file: str, cls: str, method: str | None) -> bool:
    """Whether nanovllm/<file> defines class ``cls`` (with method ``method``)."""
    tree = ast.parse((PACKAGE / file).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return method is None or any(isinstance(n, ast.FunctionDef) and n.name == method for n in node.body)
    return False


def box(ax, x, y, w, h, title, subtitle, color):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=color, edgecolor="#333333", lw=1.0))
    ax.text(x, y + 0.16, title, ha="center", va="center", fontsize=9.5, weight="bold", family="monospace")
    ax.text(x, y - 0.2, subtitle, ha="center", va="center", fontsize=8, color="#333333")


def arrow(ax, a, b, text="", rad=0.0, color="#333333", offset=(0, 0.17)):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, lw=1.3, color=color,
                                 connectionstyle=f"arc3,rad={rad}"))
    if text:
        ax.text((a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1], text, ha="center", va="center",
                fontsize=7.5, color="#555555", style="italic")


def main(out: Path) -> None:
    missing = [f"nanovllm/{f}: {c}.{m}" for f, c, m in PIECES.values() if not defined(f, c, m)]
    if missing:
        raise SystemExit(f"the figure names what the package no longer has: {missing}")
    label = {k: f"{c}.{m}()" if m else f"{c}" for k, (f, c, m) in PIECES.items()}
    where = {k: f"nanovllm/{f}" for k, (f, c, m) in PIECES.items()}

    fig, ax = plt.subplots(figsize=(8.8, 4.2), dpi=120)
    ax.set_xlim(0, 8.4)
    ax.set_ylim(0.5, 4.4)
    ax.axis("off")
    w, h = 2.3, 0.8
    top, bottom = 3.2, 1.1
    # one engine step, left to right along the top, back along the bottom
    box(ax, 1.3, top, w, h, "add_request()", "prompts, SamplingParams", "#eeeeee")
    box(ax, 4.1, top, w, h, label["schedule"], f"{where['schedule']}\nwhich sequences, how many tokens", "#f9d9b0")
    box(ax, 7.0, top, w + 0.2, h, label["run"], f"{where['run']}\nbatch → tensors → model → logits", "#c9d9ec")
    box(ax, 7.0, bottom, w + 0.2, h, label["sample"], f"{where['sample']}\nlogits → one token per sequence",
        "#c9d9ec")
    box(ax, 4.1, bottom, w, h, label["post"], f"{where['post']}\nappend, stop checks, free", "#f9d9b0")
    box(ax, 1.3, bottom, w, h, "RequestOutput", "text, token ids, finish reason", "#eeeeee")
    box(ax, 4.85, 2.15, 2.7, 0.62, label["blocks"], f"{where['blocks']}: KV blocks", "#fbe8d3")

    arrow(ax, (2.45, top), (2.95, top), "waiting")
    arrow(ax, (5.25, top), (5.85, top), "a batch")
    arrow(ax, (7.0, top - h / 2), (7.0, bottom + h / 2), "hidden states", offset=(0.55, 0))
    arrow(ax, (5.85, bottom), (5.25, bottom), "token ids")
    arrow(ax, (2.95, bottom), (2.45, bottom), "finished")
    arrow(ax, (3.25, bottom + h / 2), (3.25, top - h / 2), "next step", color="#e15759", offset=(-0.42, 0))
    ax.text(0.1, 4.2, f"{label['llm']}: one engine step; generate() repeats it until every request has finished",
            fontsize=9.5, weight="bold")
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "fig_00_engine_loop.png")
