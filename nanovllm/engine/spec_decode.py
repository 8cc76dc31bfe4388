"""Speculative decoding: guess a few tokens cheaply, check them all in one forward pass of the model.

A decode step computes one token per sequence, and on a GPU it is bound by reading the weights and the KV
cache, not by arithmetic: computing 1 + k tokens of a sequence costs little more than computing one.  So a
cheap *proposer* guesses the next k tokens (the drafts), and one forward pass of the model (the *target*)
over [last token, draft 1, ..., draft k] gives its distribution at each of those k + 1 positions, exactly as
k + 1 decode steps would have, had the drafts been the tokens they chose:

    propose:  the sequence's own earlier tokens (``ngram``: find its last few tokens earlier on and copy
              what followed them, no model at all), or a small model with the same vocabulary (``draft``)
    verify:   one forward pass over the paged cache, 1 + k query tokens per sequence (the prefill path
              with its causal mask, as a chunk of a prompt continuing the sequence)
    accept:   greedy: keep drafts while they equal the target's argmax, then the target's own token;
              sampled: rejection sampling (Leviathan et al. 2023, Chen et al. 2023), which keeps the
              target's distribution exactly: draft x is kept with probability min(1, p(x) / q(x)), and at the
              first rejection a token is drawn from max(0, p - q), normalised.  (n-gram drafts are a point
              mass: q(x) = 1, so x is kept with probability p(x), else one is drawn from p without x.)

A step adds 1 to k + 1 tokens to each sequence.  The rejected drafts' K/V was written to the cache in slots
past the sequence's end: they are simply overwritten later, and blocks taken only for them are released
(``BlockManager.trim``); a block is hashed for the prefix cache only once its tokens are accepted and
computed, so a cached block never holds a rejected token.  Stops (end of sequence, stop tokens and strings,
``max_tokens``) are checked token by token as accepted tokens are appended (``Scheduler.postprocess_verified``).

The target's distribution at each position is the sampler's own (``sampling_probs``, after ``min_tokens``
and the penalties computed as if the earlier drafts were already part of the completion), so temperature,
top-k, top-p, min-p, penalties and per-request seeds mean what they mean without speculation.  Greedy output
equals the output without speculation token for token (up to floating-point ties between the prefill and
decode kernels); sampled output has the same distribution, though not the same tokens for a given seed (the
random numbers are used differently).

Where it runs: decode steps only (prefill steps, mixed ones too, run as before); the plain engine loop (no
overlapped execution: the next step cannot be scheduled before the host knows how many tokens were
accepted); a verify step runs through the prefill CUDA graphs where it fits them, decode steps with no
drafts through the decode graphs.

The draft model has its own KV cache with as many blocks as the target's and uses the target's block tables:
the same slot of a token holds its target K/V in one cache and its draft K/V in the other, so nothing else
is allocated or freed for it.  It runs every prefill step the target runs, and before proposing it computes
the tokens it has not seen yet (the last token, and after a step that accepted every draft the last draft
too).  Its cache only shapes the proposals: whatever it holds, the target decides every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.engine.sequence import ScheduledBatch, Sequence
from nanovllm.layers.sampler import logprob_entries, process_logits, sampling_probs, sampling_tensors
from nanovllm.sampling_params import SamplingParams


# -- proposing -------------------------------------------------------------------------------------------
def ngram_propose(token_ids, k: int, n_max: int = 4, n_min: int = 1) -> list[int]:
    """Prompt lookup: find the sequence's last n tokens (n from ``n_max`` down to ``n_min``) earlier in the
    sequence, and propose the (at most ``k``) tokens that followed them.  Of several matches the latest
    with ``k`` tokens after it is taken, else the earliest (it has the most).  [] when nothing matches."""
    tokens = np.asarray(token_ids)
    length = len(tokens)
    if k <= 0:
        return []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # windows starting 0 .. length-1-n
        hits = np.flatnonzero((windows == tokens[length - n:]).all(1))
        if hits.size:
            full = hits[hits + n + k <= length]
            start = (full[-1] if full.size else hits[0]) + n
            return tokens[start:start + k].tolist()
    return []


@dataclass(slots=True)
class Position:
    """What the sampler's logits processing reads of a sequence (``process_logits``), at a draft position:
    the completion as if the drafts before it were accepted."""

    params: SamplingParams
    stop_ids: tuple[int, ...]
    prompt_token_ids: list[int]
    completion_token_ids: list[int]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.completion_token_ids)


def positions(seq: Sequence, drafts: list[int], count: int) -> list[Position]:
    """``count`` positions of ``seq`` followed by ``drafts``: the first predicts the token after the sequence,
    the j-th the token after draft j."""
    prompt, completion = seq.prompt_token_ids, seq.completion_token_ids
    return [Position(seq.params, seq.stop_ids, prompt, completion + drafts[:j]) for j in range(count)]


def target_distribution(logits: torch.Tensor, rows: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(processed logits, probabilities) of ``rows`` (``Position``s or sequences), as the sampler computes
    them: ``min_tokens`` and the penalties, then temperature, min-p, top-k and top-p.  The probabilities are
    None when every row is greedy (its token is the argmax of the processed logits)."""
    logits = logits.float()
    params = [r.params for r in rows]
    if not all(p.plain for p in params):
        logits = process_logits(logits, rows)
    if all(p.greedy for p in params):
        return logits, None
    temps, top_k, top_p, min_p = sampling_tensors(params, logits.device)
    return logits, sampling_probs(logits, temps, top_k, top_p, min_p)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of (unnormalised) ``weights`` [R, V] (the exponential race, as the sampler draws)."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return (weights / noise).argmax(-1)


# -- accepting -------------------------------------------------------------------------------------------
def accept_greedy(target_tokens: list[int], drafts: list[int]) -> list[int]:
    """Greedy verification: ``target_tokens`` are the target's choices at the 1 + len(drafts) positions.  Its
    token at each position is emitted; while it equals the draft there, the next position is valid too."""
    out = []
    for draft, token in zip(drafts, target_tokens):
        out.append(token)
        if token != draft:
            return out
    out.append(target_tokens[len(drafts)])
    return out


def rejection_sample(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                     generator: torch.Generator | None = None) -> list[int]:
    """Sampled verification of one sequence.  p: [m + 1, V] the target's distributions at the m + 1
    positions; q: [m, V] the draft's distributions the drafts were drawn from, or None (the drafts were not
    drawn from a distribution: a point mass, as n-gram drafts).  Draft j is kept with probability
    min(1, p_j(x_j) / q_j(x_j)); at the first rejection a token is drawn from max(0, p_j - q_j) (with a point
    mass: p_j without x_j); when every draft is kept, one more is drawn from p_m.  The tokens it returns are
    distributed exactly as tokens drawn one by one from the target."""
    m = len(drafts)
    d = torch.tensor(drafts, dtype=torch.int64, device=p.device)
    u = torch.rand(m, generator=generator, device=p.device)
    p_d = p[torch.arange(m, device=p.device), d]
    q_d = q[torch.arange(m, device=p.device), d] if q is not None else torch.ones_like(p_d)
    kept = (u * q_d < p_d).tolist()  # u < p/q, without dividing by a q of 0
    a = kept.index(False) if False in kept else m
    if a == m:
        return drafts + [int(draw(p[m:], generator))]
    if q is not None:
        residual = (p[a] - q[a]).clamp_min(0)
    else:
        residual = p[a].clone()
        residual[drafts[a]] = 0
    if not bool(residual.sum() > 0):  # p = q up to rounding: a rejection then had probability 0 anyway
        residual = p[a]
    return drafts[:a] + [int(draw(residual[None], generator))]


def accept(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]], draft_probs: list | None,
           generator: torch.Generator | None) -> list[list[int]]:
    """The tokens each sequence gets from a verify step.  logits: [sum(1 + len(drafts[i])), V], the target's
    logits at every position of the step; ``draft_probs[i]``: [len(drafts[i]), V], the distributions sequence
    i's drafts were drawn from (None, or a None entry: point masses, as n-gram drafts or greedy drafts).
    ``generator``: for requests without a seed of their own.  Appends the raw logprobs of the emitted
    tokens to the sequences that ask for them."""
    rows = [pos for seq, d in zip(seqs, drafts) for pos in positions(seq, d, len(d) + 1)]
    processed, probs = target_distribution(logits, rows)
    greedy_tokens = processed.argmax(-1).tolist() if any(s.params.greedy for s in seqs) else None
    out, start = [], 0
    for i, (seq, d) in enumerate(zip(seqs, drafts)):
        end = start + len(d) + 1
        if seq.params.greedy:
            tokens = accept_greedy(greedy_tokens[start:end], d)
        else:
            q = draft_probs[i] if draft_probs is not None else None
            tokens = rejection_sample(probs[start:end], d, q, seq.generator or generator)
        if seq.params.logprobs is not None:
            raw = logits[start:start + len(tokens)].float().log_softmax(-1)
            seq.logprobs += logprob_entries(raw, torch.tensor(tokens, device=raw.device),
                                            [seq.params.logprobs] * len(tokens))
        out.append(tokens)
        start = end
    return out


# -- the draft model -------------------------------------------------------------------------------------
def draft_view(seq: Sequence, tokens: list[int], computed: int) -> Sequence:
    """A stand-in of ``seq`` for the draft model: ``tokens`` (the sequence, perhaps with drafts after it),
    ``computed`` of them in the draft's cache, the sequence's own block table and parameters."""
    view = Sequence(seq.seq_id, tokens, seq.params)
    view.num_prompt_tokens = seq.num_prompt_tokens
    view.num_computed_tokens, view.block_table, view.stop_ids = computed, seq.block_table, seq.stop_ids
    return view


class DraftModel:
    """Proposes drafts with a second ``ModelRunner`` (a smaller model, the same vocabulary) whose KV cache has
    the target's block count and is addressed by the target's block tables (see the module's docstring)."""

    def __init__(self, runner):
        self.runner = runner
        self.computed: dict[int, int] = {}  # seq_id -> tokens whose draft K/V is in the cache

    def mirror(self, batch: ScheduledBatch) -> None:
        """Compute a prefill (or mixed) step's tokens in the draft's cache too (before the target's
        postprocess moves ``num_computed_tokens`` on)."""
        self.runner.forward(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            self.computed[seq.seq_id] = seq.num_computed_tokens + n

    def forget(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.computed.pop(seq.seq_id, None)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], rooms: list[int], generator) -> tuple[list[list[int]], list]:
        """Up to ``rooms[i]`` drafts for each sequence, drawn from the draft model's distribution (with the
        request's sampling parameters: greedy requests take its argmax); returns (drafts, per sequence the
        [len(drafts), V] distributions they were drawn from, or None for a greedy request)."""
        runner = self.runner
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for i, r in enumerate(rooms) if r > 0]
        first = True
        while active:
            views = []
            for i in active:
                seq = seqs[i]
                tokens = seq.token_ids + drafts[i]
                done = min(self.computed.get(seq.seq_id, 0), len(seq) - 1) if first else len(tokens) - 1
                views.append(draft_view(seq, tokens, done))
            lengths = [len(v) - v.num_computed_tokens for v in views]
            batch = ScheduledBatch(views, lengths, is_prefill=first and any(n > 1 for n in lengths))
            hidden, rows = runner.forward(batch)
            logits = runner.model.compute_logits(hidden[rows])
            rows = [Position(v.params, v.stop_ids, v.prompt_token_ids, v.completion_token_ids) for v in views]
            processed, dist = target_distribution(logits, rows)
            for j, i in enumerate(active):
                seq = seqs[i]
                if seq.params.greedy:
                    token = int(processed[j].argmax())
                else:
                    token = int(draw(dist[j:j + 1], seq.generator or generator))
                    probs[i].append(dist[j])
                drafts[i].append(token)
                self.computed[seq.seq_id] = len(views[j])
            active = [i for i in active if len(drafts[i]) < rooms[i]]
            first = False
        return drafts, [torch.stack(p) if p else None for p in probs]


# -- the engine's step -----------------------------------------------------------------------------------
class SpecDecoder:
    """The engine step with speculative decoding (``LLM._step`` hands it every step): prefill steps as
    before (mirrored in the draft model's cache, if any), decode steps as propose, verify, accept.

    Counters (since the engine started, or ``reset_stats``): ``num_drafts`` proposed, ``num_accepted`` of
    them, ``num_emitted`` tokens from verify steps, ``num_verified`` sequence-steps; ``acceptance_rate`` and
    ``tokens_per_step`` (mean tokens a sequence gains per decode step) come from them."""

    def __init__(self, config, runner, scheduler, draft_runner=None):
        self.config, self.runner, self.scheduler = config, runner, scheduler
        self.draft = DraftModel(draft_runner) if draft_runner is not None else None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.num_drafts = self.num_accepted = self.num_emitted = self.num_verified = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / max(1, self.num_drafts)

    @property
    def tokens_per_step(self) -> float:
        return self.num_emitted / max(1, self.num_verified)

    def propose(self, seqs: list[Sequence]) -> tuple[list[list[int]], list | None]:
        rooms = [self.scheduler.draft_room(s) for s in seqs]
        if self.draft is not None:
            return self.draft.propose(seqs, rooms, self.runner.sampler.generator)
        c = self.config
        return [ngram_propose(s.token_ids, r, c.prompt_lookup_max, c.prompt_lookup_min) for s, r in
                zip(seqs, rooms)], None

    def step(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, list[Sequence]]:
        sched = self.scheduler
        if batch.is_prefill:
            if self.draft is not None:
                self.draft.mirror(batch)
            finished = sched.postprocess(batch, self.runner.run(batch))
        else:
            drafts, draft_probs = self.propose(batch.seqs)
            if any(drafts):
                batch = ScheduledBatch(batch.seqs, [1 + len(d) for d in drafts], True, drafts)
                finished = sched.postprocess_verified(batch, self.verify(batch, draft_probs))
            else:
                finished = sched.postprocess(batch, self.runner.run(batch))
            for seq in batch.seqs:
                if not seq.is_finished:
                    sched.block_manager.trim(seq)  # the slots taken for drafts it did not get
        if self.draft is not None:
            self.draft.forget(finished)
        return batch, finished

    @torch.inference_mode()
    def verify(self, batch: ScheduledBatch, draft_probs) -> list[list[int]]:
        """One forward pass of the target over every sequence's last token and drafts; the accepted tokens."""
        runner = self.runner
        hidden, _ = runner.forward(batch)
        logits = runner.model.compute_logits(hidden)  # every position of a verify step is needed
        accepted = accept(logits, batch.seqs, batch.draft_tokens, draft_probs, runner.sampler.generator)
        self.num_verified += len(accepted)
        self.num_drafts += sum(map(len, batch.draft_tokens))
        self.num_accepted += sum(len(t) - 1 for t in accepted)
        self.num_emitted += sum(map(len, accepted))
        return accepted


# -- a draft for experiments -----------------------------------------------------------------------------
def save_layer_skip_draft(model_dir, out_dir, num_layers: int):
    """Save a draft model made of a model's first ``num_layers`` decoder layers, its final norm and its LM
    head (an early exit, as LayerSkip's self-speculation drafts): the same vocabulary, a fraction of the
    cost, with no training.  ``model_dir``: an HF-style folder of safetensors.  Returns ``out_dir``."""
    import json
    import re
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(f"num_layers must be in [1, {config['num_hidden_layers']}], got {num_layers}")
    config["num_hidden_layers"] = num_layers
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        for name, t in load_file(path).items():
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            if layer is None or int(layer.group(1)) < num_layers:
                tensors[name] = t
    save_file(tensors, out_dir / "model.safetensors")
    return out_dir
