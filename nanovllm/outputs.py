"""What ``LLM.generate`` returns: one ``RequestOutput`` per prompt."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # the generated tokens (a stop token, if one ended the request, included)
    text: str  # the generated tokens decoded, special tokens skipped ("" without a tokenizer)
    finish_reason: str  # "stop" (end-of-sequence or a stop token) or "length" (max_tokens or max_model_len)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id}, text={self.text!r}, "
                f"token_ids={self.token_ids}, finish_reason={self.finish_reason!r})")
