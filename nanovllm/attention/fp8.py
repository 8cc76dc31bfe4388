"""The FP8 KV cache: the format, its scales, and quantization in plain PyTorch (the reference).

``LLM(kv_cache_dtype="fp8")`` stores every cached key and value as one byte, ``torch.float8_e4m3fn``
("e4m3": 1 sign bit, 4 exponent bits, 3 mantissa bits; finite values up to 448, no infinities), instead of
the model's 2 (or 4) bytes.  A value ``x`` is stored as ``e4m3(x / scale)`` and read back as
``stored * scale``, with one float32 scale per (layer, KV head), for K and for V.

The scales.  e4m3 is a floating-point format: every value between 2**-6 and 448 keeps the same relative
precision (3 mantissa bits, at most 1/16 off after rounding), so the scale does not buy precision the
way an integer format's does; its one job is to keep the largest value below 448 (beyond, it is clipped)
without pushing the small ones below 2**-6 (where the spacing stops shrinking).  That window is about 15
binades wide, far wider than the spread of a head's keys or values, so a scale with generous headroom
costs nothing measurable while clipping costs a lot (chapter 12 measures both).  Hence:

* calibrated once at start-up: a forward pass in the model dtype over ``CALIBRATION_TOKENS`` fixed
  pseudo-random token ids (``calibration_token_ids``) records each head's largest |K| and |V|;
* ``scale = amax * SCALE_HEADROOM / 448`` rounded *up* to a power of two, so the calibration's largest
  value lands between 448/8 and 448/4 (keys and values of real text went up to 1.9x those of the random
  tokens on SmolLM2; vLLM's dynamic scales put the first batch's largest key at 200 and value at 100);
  a power of two makes ``x / scale`` and ``stored * scale`` exact, so quantization is e4m3's rounding alone,
  bit for bit the same in the reference and in the Triton kernels;
* clamped to [-448, 448] on every store, so a value past the headroom saturates instead of overflowing.

Why not vLLM's way: it keeps one scale per layer (per tensor), 1.0 unless the checkpoint has scales or
``calculate_kv_scales`` computes them from the first batch it serves.  Per head costs nothing more
here; and a scale taken from whichever batch comes first would make outputs depend on request order
(the prefix-cache and preemption tests compare runs that must agree).

The scales are device tensors set before the KV cache is allocated and CUDA graphs are captured, so the
kernels read them by pointer (a graph replays whatever they hold); with tensor parallelism each rank
calibrates the KV heads it holds.
"""

from __future__ import annotations

import torch

from nanovllm.config import KV_CACHE_DTYPES, check_kv_cache_dtype

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
SCALE_HEADROOM = 4.0  # the calibration's largest |x| is stored at most at FP8_MAX / SCALE_HEADROOM
CALIBRATION_TOKENS = 512  # tokens of the start-up calibration pass (fewer when max_model_len is shorter)
CALIBRATION_SEED = 0
__all__ = ["KV_CACHE_DTYPES", "check_kv_cache_dtype", "FP8_DTYPE", "FP8_MAX", "fp8_scale", "quantize_fp8",
           "dequantize_fp8", "kv_cache_torch_dtype", "calibration_token_ids"]


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's for "auto", e4m3 for "fp8"."""
    return FP8_DTYPE if check_kv_cache_dtype(kv_cache_dtype) == "fp8" else model_dtype


def is_fp8(cache: torch.Tensor | None) -> bool:
    return cache is not None and cache.dtype == FP8_DTYPE


def fp8_scale(amax: torch.Tensor, headroom: float = SCALE_HEADROOM) -> torch.Tensor:
    """Scales (float32, a power of two each) for per-head largest magnitudes ``amax``: the smallest power of
    two with ``amax * headroom / scale <= FP8_MAX``.  A head that was all zeros gets 1."""
    amax = amax.float()
    raw = torch.where(amax > 0, amax * headroom / FP8_MAX, torch.ones_like(amax))
    return torch.exp2(torch.ceil(torch.log2(raw)))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [..., Hkv, D] as e4m3: ``x / scale`` (``scale`` [Hkv]) clamped to +-448, rounded to nearest even."""
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 values ``x`` [..., Hkv, D] back in ``dtype``: ``x * scale`` (exact: ``scale`` is a power of two)."""
    return (x.to(torch.float32) * scale[:, None]).to(dtype)


def calibration_token_ids(vocab_size: int, n: int, seed: int = CALIBRATION_SEED) -> list[int]:
    """The fixed token ids of the calibration pass: ``n`` draws from the vocabulary, the same every run."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=gen).tolist()
