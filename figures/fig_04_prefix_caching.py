"""Figure for chapter 04: prefill time of 6 requests sharing a prefix, with prefix caching off and on, against
the length of the shared prefix; one panel per device.  Data: figures/data/fig_04_prefix_caching.csv, written
by figures/data/measure_prefix_caching.py."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def load():
    lines = [r for r in (HERE / "data" / "fig_04_prefix_caching.csv").read_text().splitlines() if not r.startswith("#")]
    data: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in csv.DictReader(lines):
        series = data.setdefault(row["device"], {}).setdefault(row["prefix_caching"], [])
        series.append((int(row["shared_prefix_tokens"]), float(row["seconds"])))
    return data


def main():
    data = load()
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.4), dpi=120, squeeze=False)
    for ax, (device, by) in zip(axes[0], sorted(data.items())):
        for mode, color in (("off", "#bdbdbd"), ("on", "#4e79a7")):
            xs, ys = zip(*sorted(by[mode]))
            ax.plot(xs, [1e3 * y for y in ys], "o-", color=color, label=f"prefix caching {mode}")
        off, on = dict(by["off"]), dict(by["on"])
        x = max(off)
        flat = max(off.values()) < 2 * min(off.values())
        if not flat:
            ax.annotate(f"{off[x] / on[x]:.1f}x faster", (x, 1e3 * (off[x] + on[x]) / 2), ha="right", fontsize=9)
        ax.set_title(device, fontsize=9)
        ax.set_xlabel("shared prefix (tokens), 6 requests + 16 own tokens each")
        ax.set_ylabel("prefill time (ms)")
        ax.set_ylim(0, 1e3 * max(off.values()) * 1.15)
        if flat:  # fixed per-step costs, not tokens, dominate
            ax.text(0.03, 0.12, "flat: fixed per-step costs (Python, kernel\nlaunches) dominate at this model size",
                    transform=ax.transAxes, fontsize=8, color="#555555")
        ax.legend(fontsize=8, loc="upper left")
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("SmolLM2-135M prefill, first request alone then five together (best of 5)", fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "fig_04_prefix_caching.png", metadata={"Software": None})


if __name__ == "__main__":
    main()
