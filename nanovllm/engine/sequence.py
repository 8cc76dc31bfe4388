"""One request as the engine sees it: its tokens, how many of them have KV in the cache, and its blocks."""

from __future__ import annotations

from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Tokens = prompt + generated.  ``num_computed_tokens`` of them have their K/V in the cache; a step
    computes the rest (or a chunk of it), and when it has computed them all it samples one more token."""

    __slots__ = ("seq_id", "status", "token_ids", "num_prompt_tokens", "num_computed_tokens",
                 "num_cached_tokens", "block_table", "params", "finish_reason", "generator", "num_preemptions")

    def __init__(self, seq_id: int, token_ids: list[int], params: SamplingParams | None = None):
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.block_table: list[int] = []
        self.params = params or SamplingParams()
        self.finish_reason: str | None = None
        self.generator = None  # per-request torch.Generator when params.seed is set
        self.num_preemptions = 0  # times its blocks were taken back and it was queued again

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
