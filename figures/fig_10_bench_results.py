"""Figure for chapter 10 (and 09): the repository's stored benchmark results, output tokens per second per
engine, one panel per GPU, workload and tensor-parallel size; each bar labelled with its date and versions.
Data: figures/data/bench_results.csv (one row per real run; columns date, gpu, torch, triton, engine,
workload, tp, requests, output_tokens, seconds, tok_per_s, note).

    python figures/fig_10_bench_results.py [CSV [PNG]]

Defaults: figures/data/bench_results.csv and figures/bench_results.png.
"""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINES = {"nanovllm": ("nanovllm", "#4e79a7"), "vllm": ("vLLM", "#59a14f"), "hf": ("HF transformers", "#bab0ac")}
COLUMNS = ("date", "gpu", "torch", "triton", "engine", "workload", "tp", "requests", "output_tokens", "seconds",
           "tok_per_s", "note")


def load(path: Path) -> list[dict]:
    """The rows of the results table, numbers converted."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path.name} lacks the columns {missing}")
        rows = list(reader)
    for r in rows:
        r["tp"], r["requests"], r["output_tokens"] = int(r["tp"]), int(r["requests"]), int(r["output_tokens"])
        r["seconds"], r["tok_per_s"] = float(r["seconds"]), float(r["tok_per_s"])
    return rows


def panels(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (gpu, workload, tp), in order of first appearance; in each, engines in a fixed order
    (nanovllm, vLLM, HF, others), then by date."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["gpu"], r["workload"], r["tp"]), []).append(r)
    order = list(ENGINES)
    for rs in groups.values():
        rs.sort(key=lambda r: (order.index(r["engine"]) if r["engine"] in order else len(order), r["engine"],
                               r["date"]))
    return groups


def bar_label(r: dict) -> str:
    name = ENGINES.get(r["engine"], (r["engine"], None))[0]
    versions = f"torch {r['torch']}" + (f", triton {r['triton']}" if r["triton"] else "")
    note = textwrap.fill(r["note"], 30) if r["note"] else ""
    return "\n".join(s for s in (name, r["date"], versions, note) if s)


def main(argv: list[str]) -> None:
    csv_path = Path(argv[0]) if argv else HERE / "data" / "bench_results.csv"
    out = Path(argv[1]) if len(argv) > 1 else HERE / "bench_results.png"
    rows = load(csv_path)
    if not rows:
        raise SystemExit(f"{csv_path.name} holds no results")
    groups = panels(rows)
    width = max(2, max(len(rs) for rs in groups.values()))
    fig, axes = plt.subplots(1, len(groups), figsize=(1.0 + 2.3 * width * len(groups), 5.2), dpi=120,
                             squeeze=False)
    for ax, ((gpu, workload, tp), rs) in zip(axes[0], groups.items()):
        values = [r["tok_per_s"] for r in rs]
        colors = [ENGINES.get(r["engine"], (None, "#9c755f"))[1] for r in rs]
        bars = ax.bar(range(len(rs)), values, color=colors, width=0.6)
        for bar, r in zip(bars, rs):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                    f"{r['tok_per_s']:,.0f} tok/s\n{r['seconds']:,.1f} s", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rs)), [bar_label(r) for r in rs], fontsize=7)
        ax.set_xlim(-0.6, max(len(rs), 2) - 0.4)
        ax.set_ylim(0, max(values) * 1.22)
        ax.set_ylabel("output tokens per second")
        sizes = {(r["requests"], r["output_tokens"]) for r in rs}
        size = (f", {rs[0]['requests']} requests, {rs[0]['output_tokens']:,} output tokens" if len(sizes) == 1
                else "")
        gpus = gpu if tp == 1 else f"{tp} x {gpu}"
        ax.set_title(f"{gpus}\n{workload} workload, tensor parallel {tp}{size}", fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})


if __name__ == "__main__":
    main(sys.argv[1:])
