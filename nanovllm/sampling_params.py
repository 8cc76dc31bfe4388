"""Per-request sampling parameters, validated when they are made."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from nanovllm.utils import check_bool, check_float, check_int

MAX_INT64 = 2 ** 63 - 1
MAX_LOGPROBS = 20  # vLLM's default max_logprobs


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
    seed: a per-request seed: the same seed gives the same tokens, whatever else is in the batch.  With
        ``n`` > 1, completion i uses ``seed + i`` (completion 0 is the n=1 request's).
    n: how many completions of the prompt; the prompt is computed once and its blocks shared.
    presence_penalty, frequency_penalty: in [-2, 2]; subtracted from a token's logit once if it occurs in the
        completion so far, and once per occurrence (OpenAI's definitions).
    repetition_penalty: > 0; a token seen in the prompt or the completion has its logit divided by it if
        positive, multiplied if negative (HF's definition; 1 is off).
    min_p: in [0, 1]; drop tokens whose probability is below ``min_p`` times the best token's.
    stop: strings that end the request when the completion's text contains one; the text is cut before it
        (``finish_reason="stop"``, ``stop_reason`` the string), or after it with ``include_stop_str_in_output``.
    min_tokens: the end-of-sequence token and ``stop_token_ids`` get probability 0 (and stop strings do not
        count) until the completion has this many tokens.
    logprobs: per generated token, the log-probabilities of the sampled token and of the ``logprobs`` most
        likely ones (0: the sampled one only), from the model's raw distribution (vLLM's default
        ``raw_logprobs``: before penalties, temperature, top-k/top-p/min-p).  At most ``MAX_LOGPROBS``.
    prompt_logprobs: the same for each prompt token after the first (such a request skips the prefix cache).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # set when made (the engine reads them per row and step, where a property would cost): does sampling need
    # the request's token counts (a penalty)?  Is it temperature, top-k and top-p alone (what the fused
    # kernel handles): no penalties, min-p, min-tokens or logprobs?
    penalized: bool = field(init=False, repr=False, compare=False)
    plain: bool = field(init=False, repr=False, compare=False)

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
        self.n = check_int("n", self.n, 1)
        for name in ("presence_penalty", "frequency_penalty"):
            value = check_float(name, getattr(self, name))
            if not -2 <= value <= 2:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = check_float("repetition_penalty", self.repetition_penalty)
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 is off), "
                             f"got {self.repetition_penalty}")
        self.min_p = check_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.stop = _stop_strings(self.stop)
        self.include_stop_str_in_output = check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        self.min_tokens = check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), 0, MAX_LOGPROBS))
        self.penalized = self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
        self.plain = not (self.penalized or self.min_p > 0 or self.min_tokens > 0 or self.logprobs is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0



def _stop_strings(stop) -> list[str]:
    """``stop`` (None, a str or a list of str) as a list of non-empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise TypeError(f"stop must be a str or a list of str, got {type(s).__name__} at index {i}")
        if not s:
            raise ValueError(f"stop must not hold an empty string (at index {i})")
    return list(stop)


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
