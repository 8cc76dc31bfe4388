"""Turning logits into next tokens: greedy, temperature, top-k, top-p, with per-request seeds.

Sampling uses the exponential-race trick: ``argmax(p / E)`` with ``E ~ Exponential(1)`` draws from ``p``
exactly, with no cumulative sums, and a per-request generator makes a seeded request's draws independent
of whatever else is in the batch.

``Sampler`` is what the engine calls: on CUDA, batches without top-k/top-p take the fused Gumbel-max
kernel (``triton_sampler.py``), seeded per row by ``row_seed``; everything else takes ``sample`` below.

Requests that need more (``SamplingParams.plain`` false) take the PyTorch path, in vLLM's order: their
logprobs are taken from the raw logits first; then ``min_tokens`` masks the stop tokens, the penalties
(repetition, frequency, presence) change the logits, and ``sample`` scales by temperature, applies min-p,
then top-k/top-p.  The penalties' token counts are built each step from the sequences' token lists (one
host-to-device copy of every penalized request's tokens per step): only batches with a penalized request
pay for them, and only for those rows.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None):
    """Mask (to -inf) every token outside each row's top-k and top-p set.  logits: [S, V] float32;
    top_k: [S] int (<= 0: off), top_p: [S] float (1: off)."""
    sorted_logits, order = logits.sort(-1, descending=True)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, logits.shape[-1])
        rank = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits.masked_fill_(rank >= k.unsqueeze(1), float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the better tokens
        # top_p == 1 is off: the rounded cumsum can reach 1.0 before the last token, so test it explicitly
        drop = (before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
        drop[:, 0] = False  # the best token always stays
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask every token whose probability is below ``min_p`` times its row's best (HF's ``MinPLogitsWarper``).
    logits: [S, V] float32 (after temperature); min_p: [S] (0: off)."""
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(-1, keepdim=True), float("-inf"))


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties.  logits: [S, V] float32; prompt_mask: [S, V] bool, the tokens in each prompt; counts:
    [S, V], each token's occurrences in each completion; presence, frequency, repetition: [S].  A token seen
    in the prompt or the completion has its logit divided by the repetition penalty if positive, multiplied if
    negative (HF's ``RepetitionPenaltyLogitsProcessor``); then each occurrence in the completion subtracts the
    frequency penalty, and occurring at all the presence penalty (OpenAI's definitions)."""
    rep = repetition.unsqueeze(1)
    seen = prompt_mask | (counts > 0)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0)


def token_counts(id_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(id_lists), vocab_size] float32: how often each token id occurs in each list."""
    width = max(1, max(map(len, id_lists)))
    ids = np.full((len(id_lists), width), vocab_size, dtype=np.int64)  # padding counts in an extra column
    for i, row in enumerate(id_lists):
        ids[i, :len(row)] = row
    ids = torch.from_numpy(ids).to(device)
    counts = torch.zeros(len(id_lists), vocab_size + 1, device=device)
    return counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))[:, :vocab_size]


def process_logits(logits: torch.Tensor, seqs) -> torch.Tensor:
    """``min_tokens`` (stop tokens masked while a completion is shorter) and the penalties, for the rows
    whose requests ask for them.  logits: [S, V] float32, not changed (a new tensor is returned)."""
    device, vocab = logits.device, logits.shape[-1]
    rows, cols = [], []
    for i, s in enumerate(seqs):
        if s.num_completion_tokens < s.params.min_tokens:
            rows += [i] * len(s.stop_ids)
            cols += s.stop_ids
    if rows:
        logits = logits.index_put((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                                  torch.tensor(float("-inf"), device=device))
    pen = [s for s in seqs if s.params.penalized]
    if pen:
        index = torch.tensor([i for i, s in enumerate(seqs) if s.params.penalized], device=device)
        p = torch.tensor([(s.params.presence_penalty, s.params.frequency_penalty, s.params.repetition_penalty)
                          for s in pen], dtype=torch.float32).to(device)
        counts = token_counts([s.completion_token_ids for s in pen], vocab, device)
        prompt_mask = token_counts([s.prompt_token_ids for s in pen], vocab, device) > 0
        rows = apply_penalties(logits.index_select(0, index), prompt_mask, counts, p[:, 0], p[:, 1], p[:, 2])
        logits = logits.index_copy(0, index, rows)
    return logits


def logprob_entries(logprobs: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[tuple]:
    """Per row: (ids, logprobs, rank of the first), ``tokens[i]`` first, then row i's ``ks[i]`` most likely
    tokens.  logprobs: [R, V]; tokens: [R].  One copy to the host (a sync)."""
    own = logprobs.gather(1, tokens.unsqueeze(1))
    rank = (logprobs > own).sum(-1) + 1
    top_v, top_i = logprobs.topk(max(ks), -1)
    tok, own, rank, top_v, top_i = (t.tolist() for t in (tokens, own.squeeze(1), rank, top_v, top_i))
    return [([tok[j]] + top_i[j][:k], [own[j]] + top_v[j][:k], rank[j]) for j, k in enumerate(ks)]


def record_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, seqs) -> None:
    """Append to each requesting sequence's ``logprobs`` the entry of its sampled token (``logprob_entries``).
    logprobs: [S, V]; tokens: [S].  Only batches with such a request pay (a sync)."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    index = torch.tensor(rows, device=logprobs.device)
    entries = logprob_entries(logprobs.index_select(0, index), tokens.index_select(0, index),
                              [seqs[i].params.logprobs for i in rows])
    for i, entry in zip(rows, entries):
        seqs[i].logprobs.append(entry)


def record_prompt_logprobs(compute_logits, hidden: torch.Tensor, batch) -> None:
    """For each sequence of a prefill step that asks for ``prompt_logprobs``: the entries of the prompt tokens
    this step's positions predict (position p's logits predict token p + 1; the first prompt token has
    None).  hidden: [tokens of the step, hidden].  Entries already made (before a preemption) are kept."""
    offset = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start, k = seq.num_computed_tokens, seq.params.prompt_logprobs
        if k is not None:
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = [None]
            lo, hi = max(start + 1, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt_tokens - 1) + 1
            if hi > lo:
                rows = hidden[offset + lo - 1 - start:offset + hi - 1 - start]
                logprobs = compute_logits(rows).float().log_softmax(-1)
                targets = torch.tensor(seq.token_ids[lo:hi], device=logprobs.device)
                seq.prompt_logprobs += logprob_entries(logprobs, targets, [k] * (hi - lo))
        offset += n


def sampling_probs(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor | None = None,
                   top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution ``sample`` draws from: [S, V] float32 (a greedy row, temperature 0, gets its
    distribution at temperature 1; greedy callers take the argmax of the logits instead).  The verify step
    of speculative decoding reads the same distribution, so both keep the same sampling semantics."""
    greedy = temperatures == 0
    # shift the row maximum to 0 first (softmax does not change): a tiny temperature then sends the other
    # logits to -inf instead of sending the best ones to inf, where softmax would give NaN
    scaled = (logits - logits.amax(-1, keepdim=True)) / torch.where(greedy, 1.0, temperatures).unsqueeze(1)
    if min_p is not None:
        scaled = apply_min_p(scaled, min_p)
    if top_k is not None or top_p is not None:
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    return scaled.softmax(-1)


def sampling_tensors(params, device: torch.device):
    """(temperatures, top_k, top_p, min_p) of a batch's ``SamplingParams`` as [S] tensors on ``device``;
    each of the last three is None when no request uses it."""
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(device)
    top_k = top_p = min_p = None
    if any(p.top_k > 0 for p in params):
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64).to(device)
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32).to(device)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32).to(device)
    return temps, top_k, top_p, min_p


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None, generators: list | None = None,
           default_generator: torch.Generator | None = None, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [S, V]; temperatures: [S] (0 = greedy).  ``generators[i]`` (or None) seeds row i.
    ``min_p``: [S] (0: off), applied after temperature, before top-k/top-p (vLLM's order)."""
    logits = logits.float()
    greedy = temperatures == 0
    if bool(greedy.all()):
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperatures, top_k, top_p, min_p)
    noise = torch.empty_like(probs).exponential_(generator=default_generator)
    if generators:
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(-1)
    return torch.where(greedy, logits.argmax(-1), sampled)


def row_seed(seed: int, step: int) -> int:
    """A Philox seed for one row of one step, mixed from a request seed and its token count (< 2**53, so
    it survives the float64 staging buffer exactly)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**53 - 1)


class Sampler:
    """Next tokens for a batch of sequences, one row of logits each.

    Two paths, the same distribution: the fused Gumbel-max kernel on CUDA for batches without top-k/top-p
    (a seeded request's noise comes from ``row_seed(seed, tokens generated)``, an unseeded row's from the
    engine's ``seed``), else the PyTorch sampler (per-request ``torch.Generator``s for seeded requests),
    which also takes the requests that need more than temperature, top-k and top-p (``SamplingParams.plain``)."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.rng = random.Random(seed)  # per-step seeds of the fused kernel
        self.fused = None
        if device.type == "cuda":
            try:
                from nanovllm.layers.triton_sampler import gumbel_sample

                self.fused = gumbel_sample
            except ImportError:
                pass

    def uses_fused(self, seqs) -> bool:
        return self.fused is not None and not any(s.params.top_k > 0 or s.params.top_p < 1 or not s.params.plain
                                                  for s in seqs)

    def __call__(self, logits: torch.Tensor, seqs, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [len(seqs)] on the logits' device.  ``staging``: a pinned [2, len(seqs)] float64 buffer for
        the fused kernel's parameters (else one is allocated)."""
        params = [s.params for s in seqs]
        if self.uses_fused(seqs):
            base = self.rng.getrandbits(62)
            if staging is None:
                staging = torch.empty(2, len(seqs), dtype=torch.float64, pin_memory=True)
            staging[0] = torch.tensor([p.temperature for p in params], dtype=torch.float64)
            staging[1] = torch.tensor([row_seed(p.seed, s.num_completion_tokens) if p.seed is not None
                                       else row_seed(base, i) for i, (s, p) in enumerate(zip(seqs, params))],
                                      dtype=torch.float64)
            dev = staging.to(self.device, non_blocking=True)
            return self.fused(logits, dev[0], dev[1])  # the kernel reads float64 itself
        logprobs = None
        if not all(p.plain for p in params):
            if any(p.logprobs is not None for p in params):
                logprobs = logits.float().log_softmax(-1)  # of the raw logits (vLLM's raw_logprobs)
            logits = process_logits(logits.float(), seqs)
        temps, top_k, top_p, min_p = sampling_tensors(params, self.device)
        generators = [s.generator for s in seqs] if any(s.generator is not None for s in seqs) else None
        tokens = sample(logits, temps, top_k, top_p, generators, self.generator, min_p)
        if logprobs is not None:
            record_logprobs(logprobs, tokens, seqs)
        return tokens

    def warmup(self, vocab_size: int, dtype: torch.dtype) -> None:
        """Compile both versions of the fused kernel (whole rows, rows cut in column ranges) now, not in the
        middle of the first requests."""
        if self.fused is None:
            return
        from nanovllm.layers.triton_sampler import whole_row_batch

        for rows in (1, whole_row_batch(self.device)):
            logits = torch.zeros(rows, vocab_size, dtype=dtype, device=self.device)
            params = torch.full((2, rows), 0.5, dtype=torch.float64, device=self.device)  # as __call__ stages them
            self.fused(logits, params[0], params[1])
        torch.cuda.synchronize(self.device)
