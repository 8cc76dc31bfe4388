"""Turning logits into next tokens: greedy, temperature, top-k, top-p, with per-request seeds.

Sampling uses the exponential-race trick: ``argmax(p / E)`` with ``E ~ Exponential(1)`` draws from ``p``
exactly, with no cumulative sums, and a per-request generator makes a seeded request's draws independent
of whatever else is in the batch.

``Sampler`` is what the engine calls: on CUDA, batches without top-k/top-p take the fused Gumbel-max
kernel (``triton_sampler.py``), seeded per row by ``row_seed``; everything else takes ``sample`` below.
"""

from __future__ import annotations

import random

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


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None, generators: list | None = None,
           default_generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [S, V]; temperatures: [S] (0 = greedy).  ``generators[i]`` (or None) seeds row i."""
    logits = logits.float()
    greedy = temperatures == 0
    if bool(greedy.all()):
        return logits.argmax(-1)
    # shift the row maximum to 0 first (softmax does not change): a tiny temperature then sends the other
    # logits to -inf instead of sending the best ones to inf, where softmax would give NaN
    scaled = (logits - logits.amax(-1, keepdim=True)) / torch.where(greedy, 1.0, temperatures).unsqueeze(1)
    if top_k is not None or top_p is not None:
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(-1)
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
    engine's ``seed``), else the PyTorch sampler (per-request ``torch.Generator``s for seeded requests)."""

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
        return self.fused is not None and not any(s.params.top_k > 0 or s.params.top_p < 1 for s in seqs)

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
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(self.device)
        top_k = top_p = None
        if any(p.top_k > 0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64).to(self.device)
        if any(p.top_p < 1 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32).to(self.device)
        generators = [s.generator for s in seqs] if any(s.generator is not None for s in seqs) else None
        return sample(logits, temps, top_k, top_p, generators, self.generator)

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
