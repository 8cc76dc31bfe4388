"""Figure for chapter 07: timelines of four decode steps, host (CPU) and GPU, in three ways of running them:
eager (every kernel launched from Python), a CUDA graph per step (one launch; the GPU waits while the host
postprocesses, schedules and prepares), and a CUDA graph with overlapped decode (the host prepares step N+1
while the GPU runs step N).  Schematic: the durations in figures/data/fig_07_overlap.json are illustrative.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
COLORS = {"schedule": "#f28e2b", "prepare": "#edc948", "launch": "#e15759", "postprocess": "#76b7b2",
          "wait": "#eeeeee", "gpu": "#4e79a7"}
CPU_Y, GPU_Y, H = 1.0, 0.0, 0.6


def eager(d):
    host, e = d["host"], d["eager"]
    cpu, gpu, t, free = [], [], 0.0, 0.0
    for _ in range(d["steps"]):
        for kind in ("schedule", "prepare"):
            cpu.append((t, host[kind], kind, None))
            t += host[kind]
        for _ in range(e["kernels"]):
            cpu.append((t, e["launch"], "launch", None))
            t += e["launch"]
            start = max(t, free)
            gpu.append((start, e["kernel"], "gpu", None))
            free = start + e["kernel"]
        if free > t:
            cpu.append((t, free - t, "wait", None))
            t = free
        cpu.append((t, host["postprocess"], "postprocess", None))
        t += host["postprocess"]
    return cpu, gpu, t


def graph(d, overlap):
    host, g = d["host"], d["graph"]
    cpu, gpu, t, free = [], [], 0.0, 0.0
    ends = []

    def launch(step):
        nonlocal t, free
        for kind in ("schedule", "prepare"):
            cpu.append((t, host[kind], kind, None))
            t += host[kind]
        cpu.append((t, g["replay"], "launch", None))
        t += g["replay"]
        start = max(t, free)
        gpu.append((start, g["gpu_step"], "gpu", f"step {step + 1}"))
        free = start + g["gpu_step"]
        ends.append(free)

    def collect(step):
        nonlocal t
        if ends[step] > t:
            cpu.append((t, ends[step] - t, "wait", None))
            t = ends[step]
        cpu.append((t, host["postprocess"], "postprocess", None))
        t += host["postprocess"]

    if not overlap:
        for step in range(d["steps"]):
            launch(step)
            collect(step)
    else:
        launch(0)
        for step in range(1, d["steps"]):
            launch(step)  # step N+1 is scheduled and launched before step N's tokens are known
            collect(step - 1)
        collect(d["steps"] - 1)
    return cpu, gpu, t


def draw(ax, cpu, gpu, total, title):
    for lane, y in ((cpu, CPU_Y), (gpu, GPU_Y)):
        for start, width, kind, label in lane:
            hatch = "///" if kind == "wait" else None
            edge = {"wait": "#999999", "gpu": "white"}.get(kind, "none")
            ax.broken_barh([(start, width)], (y - H / 2, H), facecolors=COLORS[kind], hatch=hatch,
                           edgecolor=edge, lw=0.4 if kind == "wait" else 1.0)
            if label:
                ax.text(start + width / 2, y, label, ha="center", va="center", fontsize=7, color="white")
    busy = sum(w for _, w, _, _ in gpu)
    ax.set_yticks([GPU_Y, CPU_Y], ["GPU", "CPU"])
    ax.set_ylim(-0.6, 1.6)
    ax.set_title(f"{title}: 4 steps in {total:.1f} ms, GPU busy {busy / total:.0%} of the time", fontsize=9,
                 loc="left")
    ax.grid(axis="x", color="#dddddd", lw=0.5)
    ax.set_axisbelow(True)


def main():
    d = json.loads((HERE / "data" / "fig_07_overlap.json").read_text())
    runs = [(eager(d), "eager: one launch per kernel"),
            (graph(d, overlap=False), "CUDA graph: one launch per step"),
            (graph(d, overlap=True), "CUDA graph + overlapped decode")]
    xmax = max(total for (_, _, total), _ in runs) * 1.02
    fig, axes = plt.subplots(3, 1, figsize=(10, 5.4), dpi=120, sharex=True)
    for ax, ((cpu, gpu, total), title) in zip(axes, runs):
        draw(ax, cpu, gpu, total, title)
        ax.set_xlim(0, xmax)
    axes[-1].set_xlabel("time (ms, schematic)")
    names = ["schedule", "prepare", "launch", "postprocess", "wait", "gpu"]
    labels = ["schedule", "prepare inputs", "launch", "postprocess", "wait for the GPU", "GPU work"]
    handles = [plt.Rectangle((0, 0), 1, 1, fc=COLORS[n], hatch="///" if n == "wait" else None,
                             ec="#999999" if n == "wait" else "none") for n in names]
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(HERE / "fig_07_overlap.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
