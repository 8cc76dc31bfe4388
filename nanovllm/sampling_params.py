"""Per-request sampling parameters, validated when they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nanovllm.utils import check_int


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token of one request (vLLM-compatible names and meanings).

    temperature: 0 is greedy; higher flattens the distribution.
    top_p: keep the smallest set of tokens whose probability adds up to top_p (1 keeps all).
    top_k: keep the k most likely tokens; -1 or 0 keeps all.
    max_tokens: how many tokens to generate at most.
    ignore_eos: keep going past the end-of-sequence token (benchmarks).
    stop_token_ids: extra token ids that end the request (kept in ``token_ids``).
    seed: a per-request seed: the same seed gives the same tokens, whatever else is in the batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if math.isnan(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p must be a number, got {type(self.top_p).__name__}")
        if not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive int, got {self.top_k}")
        self.max_tokens = check_int("max_tokens", self.max_tokens, 1)
        if self.stop_token_ids is not None:
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
                raise TypeError("stop_token_ids must be a list of ints")
            self.stop_token_ids = list(self.stop_token_ids)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if self.seed is not None and not -(2 ** 63) <= self.seed < 2 ** 64:  # what torch.Generator takes
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
