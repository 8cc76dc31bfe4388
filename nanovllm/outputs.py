"""What ``LLM.generate`` returns: one ``RequestOutput`` per prompt, holding one ``CompletionOutput`` per
completion (``SamplingParams.n``), as vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """One token's log-probability, its rank in the distribution (1 is the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # the generated tokens decoded, special tokens skipped, cut at a stop string
    token_ids: list[int]  # the generated tokens (a stop token, if one ended the request, included)
    cumulative_logprob: float | None  # the sum of the sampled tokens' logprobs (with ``logprobs`` only)
    logprobs: list[dict[int, Logprob]] | None  # per token: the sampled one first, then the top ones
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while it runs
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (None for EOS)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """``token_ids``, ``text``, ``finish_reason`` and ``stop_reason`` are the first completion's."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # the generated tokens (a stop token, if one ended the request, included)
    text: str  # the generated tokens decoded, special tokens skipped ("" without a tokenizer)
    finish_reason: str  # "stop" (end-of-sequence, a stop token or string) or "length" (max_tokens or max_model_len)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    outputs: list[CompletionOutput] = field(default_factory=list)
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # None for the first prompt token
    finished: bool = True

    def __repr__(self) -> str:
        more = f", n={len(self.outputs)}" if len(self.outputs) > 1 else ""
        return (f"RequestOutput(request_id={self.request_id}, text={self.text!r}, "
                f"token_ids={self.token_ids}, finish_reason={self.finish_reason!r}{more})")
