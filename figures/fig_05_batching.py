"""Figure for chapter 05: static batching (a batch runs until its longest request finishes) against
continuous batching (a finished request's slot is refilled at the next step), for six requests and three
slots.  Data: figures/data/fig_05_batching.json.

Each request takes one prefill step and then its decode steps.  In the continuous schedule a step that
admits new requests is a prefill step for them alone (the running ones wait, as in nanovllm's scheduler).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PREFILL, DECODE, IDLE = "#f28e2b", "#4e79a7", "#eeeeee"


def static_schedule(reqs, slots):
    """Per step, {request: "prefill" | "decode"}; groups of `slots` requests, one after another."""
    steps = []
    for g in range(0, len(reqs), slots):
        group = reqs[g:g + slots]
        steps.append({r["name"]: "prefill" for r in group})
        for t in range(max(r["decode"] for r in group)):
            steps.append({r["name"]: "decode" for r in group if t < r["decode"]})
    return steps


def continuous_schedule(reqs, slots):
    waiting, running, left, steps = list(reqs), [], {}, []
    while waiting or running:
        if waiting and len(running) < slots:  # admit: a prefill step for the newcomers
            new = waiting[:slots - len(running)]
            del waiting[:len(new)]
            for r in new:
                left[r["name"]] = r["decode"]
            running += [r["name"] for r in new]
            steps.append({r["name"]: "prefill" for r in new})
            continue
        steps.append({name: "decode" for name in running})
        for name in running:
            left[name] -= 1
        running = [n for n in running if left[n] > 0]
    return steps


def draw(ax, steps, names, slots, title, xmax):
    for t, step in enumerate(steps):
        for name, kind in step.items():
            y = names.index(name)
            ax.add_patch(plt.Rectangle((t, y - 0.38), 1, 0.76, color=PREFILL if kind == "prefill" else DECODE))
        busy = sum(1 for k in step.values() if k == "decode")
        if not any(k == "prefill" for k in step.values()) and busy < slots:
            ax.text(t + 0.5, len(names) - 0.3, str(slots - busy), ha="center", fontsize=7, color="#e15759")
    ax.set_xlim(0, xmax)
    ax.set_ylim(len(names) - 0.1, -0.6)
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(0, xmax + 1, 2))
    ax.set_title(f"{title}: {len(steps)} steps", fontsize=10, loc="left")
    ax.grid(axis="x", color="#dddddd", lw=0.5)
    ax.set_axisbelow(True)


def main():
    data = json.loads((HERE / "data" / "fig_05_batching.json").read_text())
    reqs, slots = data["requests"], data["slots"]
    names = [r["name"] for r in reqs]
    static, continuous = static_schedule(reqs, slots), continuous_schedule(reqs, slots)
    xmax = max(len(static), len(continuous)) + 1
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4.6), dpi=120, sharex=True)
    draw(ax1, static, names, slots, f"static batching, {slots} requests per batch", xmax)
    draw(ax2, continuous, names, slots, f"continuous batching, {slots} slots", xmax)
    ax2.set_xlabel("engine step  (red digits: empty slots in a decode step)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (PREFILL, DECODE)]
    ax1.legend(handles, ["prefill", "decode"], loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(HERE / "fig_05_batching.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
