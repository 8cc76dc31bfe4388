"""The engine's data types: one request (``Sequence``) and one step's work (``ScheduledBatch``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Tokens = prompt + generated.  ``num_computed_tokens`` of them have their K/V in the cache; a step
    computes the rest (or a chunk of it), and when it has computed them all it samples one more token.

    ``num_pending_tokens``: tokens sampled by steps still running on the GPU (overlapped execution,
    ``engine/overlap.py``).  They count in the sequence's length, so the next step is scheduled at the
    right position, but their values are not in ``token_ids`` until they reach the host (vLLM's
    ``num_output_placeholders``).  Always 0 in the plain step loop.

    What only some requests need (the engine sets it): ``detokenizer`` (an ``IncrementalDetokenizer``, for stop
    strings), ``stop_ids`` (what ``min_tokens`` masks), ``logprobs`` (per sampled token, (ids, logprobs,
    rank of the first); the sampled token is the first), ``prompt_logprobs``, ``children`` (the other
    completions of an ``n`` > 1 request, queued once this one's prompt is computed)."""

    __slots__ = ("seq_id", "status", "token_ids", "num_prompt_tokens", "num_computed_tokens", "num_pending_tokens",
                 "num_cached_tokens", "block_table", "params", "finish_reason", "generator", "num_preemptions",
                 "stop_reason", "stop_text", "detokenizer", "stop_ids", "logprobs", "prompt_logprobs", "children")

    def __init__(self, seq_id: int, token_ids: list[int], params: SamplingParams | None = None):
        self.seq_id = seq_id
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.block_table: list[int] = []
        self.params = params or SamplingParams()
        self.finish_reason: str | None = None
        self.generator = None  # per-request torch.Generator when params.seed is set
        self.num_preemptions = 0  # times its blocks were taken back and it was queued again
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.stop_text: str | None = None  # the completion's text, cut at the stop string that ended it
        self.detokenizer = None
        self.stop_ids: tuple[int, ...] = ()
        self.logprobs: list | None = [] if self.params.logprobs is not None else None
        self.prompt_logprobs: list | None = None
        self.children: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_completion_tokens(self) -> int:
        return len(self) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    def __repr__(self) -> str:
        pending = f", pending={self.num_pending_tokens}" if self.num_pending_tokens else ""
        return (f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}{pending}, blocks={self.block_table})")


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work, as the scheduler hands it to the runner: which sequences, and how many of each
    one's uncomputed tokens the step computes (all of a decode's one; a chunk of a long prompt)."""

    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens computed this step, per sequence
    is_prefill: bool
    # a verify step of speculative decoding (``engine/spec_decode.py``): each sequence's draft tokens, computed
    # after its last token (and counted in ``num_new_tokens``); they are not in ``token_ids`` until accepted
    draft_tokens: list[list[int]] | None = None

    def samples(self, i: int) -> bool:
        """Does sequence i finish computing its tokens this step (and so sample a new one)?"""
        seq = self.seqs[i]
        drafts = len(self.draft_tokens[i]) if self.draft_tokens is not None else 0
        return seq.num_computed_tokens + self.num_new_tokens[i] - drafts == len(seq)

    def new_token_ids(self, i: int) -> list[int]:
        """The ids of the tokens sequence i computes this step (its draft tokens last)."""
        seq, start = self.seqs[i], self.seqs[i].num_computed_tokens
        if self.draft_tokens is None:
            return seq.token_ids[start:start + self.num_new_tokens[i]]
        return seq.token_ids[start:] + self.draft_tokens[i]
