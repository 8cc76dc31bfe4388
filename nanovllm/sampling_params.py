"""Per-request sampling parameters, validated when they are made."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from nanovllm.utils import check_bool, check_float, check_int

MAX_INT64 = 2 ** 63 - 1


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token of one request (vLLM-compatible names and meanings).  numpy numbers are
    taken where Python ones are, and stored as Python ones.

    temperature: 0 is greedy; higher flattens the distribution.
    top_p: keep the smallest set of tokens whose probability adds up to top_p (1 keeps all).
    top_k: keep the k most likely tokens; -1 or 0 keeps all.
    max_tokens: how many tokens to generate at most.
    ignore_eos: keep going past the end-of-sequence token (benchmarks).
    stop_token_ids: extra token ids that end the request (kept in ``token_ids``); any iterable of ints,
        stored as a list.
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
        self.temperature = check_float("temperature", self.temperature)
        if not 0 <= self.temperature < math.inf:  # also rejects NaN
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        self.top_p = check_float("top_p", self.top_p)
        if not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive int, got {self.top_k}")
        if self.top_k > MAX_INT64:  # the sampler holds it in an int64; any k >= the vocabulary keeps every token
            raise ValueError(f"top_k must be at most 2**63 - 1 (use -1 to keep every token), got {self.top_k}")
        self.max_tokens = check_int("max_tokens", self.max_tokens, 1)
        self.ignore_eos = check_bool("ignore_eos", self.ignore_eos)
        if self.stop_token_ids is not None:
            self.stop_token_ids = _token_id_list("stop_token_ids", self.stop_token_ids)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed)
            if not -(2 ** 63) <= self.seed < 2 ** 64:  # what torch.Generator takes
                raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _token_id_list(name: str, ids) -> list[int]:
    """Any iterable of token ids (a list, a tuple, a generator, a numpy array) as a list of Python ints, read
    once: a generator checked first and copied after would be left empty."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name} must be a list of token ids (ints), got {type(ids).__name__}")
    ids = list(ids)
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{name} must be a list of token ids (ints), got {type(t).__name__} at index {i}")
        if t < 0:
            raise ValueError(f"{name} must hold token ids >= 0, got {t} at index {i}")
    return [int(t) for t in ids]
