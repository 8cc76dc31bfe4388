"""Chapter 12 (quantized KV cache): the chapter's e4m3 from scratch is PyTorch's float8_e4m3fn and rounds as the
package stores, its scales are the package's, and its figure script draws from PyTorch's values alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nbimport import load_chapter

from nanovllm.attention.fp8 import FP8_DTYPE, dequantize_fp8, fp8_scale, quantize_fp8

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ch12():
    return load_chapter("12_quantized_kv")


def test_e4m3_values_are_torchs(ch12):
    theirs = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    ours = torch.tensor([ch12.e4m3_value(c) for c in range(256)])
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])


def test_e4m3_round_is_the_package_store(ch12):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3000, generator=gen) * 100, torch.randn(3000, generator=gen) * 1e-3,
                   (ch12.E4M3[1:] + ch12.E4M3[:-1]).float() / 2, torch.tensor([448.0, 449.0, -1e4, 0.0])])
    one = torch.ones(1)
    package = dequantize_fp8(quantize_fp8(x[:, None, None], one), one, torch.float32).flatten()
    assert torch.equal(ch12.e4m3_round(x), package)


def test_scales_and_fake_quantize_are_the_packages(ch12):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, 16, generator=gen) * torch.tensor([0.01, 2.0, 300.0])[:, None]
    amax = x.abs().amax((0, 2))
    scale = fp8_scale(amax)
    assert scale.tolist() == [ch12.scale_from_amax(a) for a in amax.tolist()]
    assert ch12.scale_from_amax(0.0) == 1.0 == fp8_scale(torch.zeros(1)).item()
    assert torch.equal(ch12.fake_quantize(x, scale), dequantize_fp8(quantize_fp8(x, scale), scale, torch.float32))


def test_figure_script(tmp_path):
    script = tmp_path / "fig_12_fp8_grid.py"
    shutil.copy(ROOT / "figures" / "fig_12_fp8_grid.py", script)
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=300)
    assert (tmp_path / "fig_12_fp8_grid.png").stat().st_size > 10_000
