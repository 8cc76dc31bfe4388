"""Turning logits into next tokens: greedy, temperature, top-k, top-p, with per-request seeds.

Sampling uses the exponential-race trick: ``argmax(p / E)`` with ``E ~ Exponential(1)`` draws from ``p``
exactly, with no cumulative sums, and a per-request generator makes a seeded request's draws independent
of whatever else is in the batch.
"""

from __future__ import annotations

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
