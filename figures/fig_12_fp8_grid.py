"""Figure for chapter 12: how far apart neighbouring representable values are, relative to their size, for
e4m3 (the FP8 cache's format: 3 mantissa bits, so 1/15 to 1/8 apart across its whole normal range, 2**-6 to 448)
and for int8 with the same largest value (255 evenly spaced steps, so the gap relative to a value grows as the
value shrinks).  No data file: the values come from PyTorch's float8_e4m3fn."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


def main():
    values = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # +2**-9 .. 448
    e4m3_gap = (values[1:] - values[:-1]) / values[:-1]
    step = 448 / 127  # int8 scaled so that 127 is 448
    ints = torch.arange(1, 127, dtype=torch.float64) * step
    int8_gap = step / ints

    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=120)
    ax.loglog(values[:-1], e4m3_gap, ".-", color="#4e79a7", ms=4, label="e4m3 (FP8)")
    ax.loglog(ints, int8_gap, ".-", color="#e15759", ms=3, label="int8, same largest value")
    ax.axvspan(float(values[0]), 2.0 ** -6, color="#bab0ac", alpha=0.3, lw=0)
    ax.text(2.0 ** -8.2, 0.02, "e4m3\nsubnormals", fontsize=8, ha="center")
    ax.axhline(1 / 8, color="gray", lw=0.6, ls=":")
    ax.set(xlabel="value (largest: 448)", ylabel="gap to the next value / value",
           title="Relative precision of 8-bit formats")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(HERE / "fig_12_fp8_grid.png")


if __name__ == "__main__":
    main()
