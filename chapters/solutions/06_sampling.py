# Solutions to chapter 06's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (logits, top_p_mask, toy, ...).

# %% exercise 1
def min_p_mask(logits, min_p):
    probs = logits.softmax(-1)
    keep = probs >= min_p[:, None] * probs.max(-1, keepdim=True).values  # min_p = 0 keeps every token
    return logits.masked_fill(~keep, float("-inf"))


# %% exercise 2
# a higher temperature flattens the distribution: many more tokens are needed to reach 90 % of the mass
more_tokens_at_high_temperature = (int(top_p_mask(logits / 1.2, 0.9).isfinite().sum())
                                   - int(top_p_mask(logits / 0.6, 0.9).isfinite().sum()))


# %% exercise 3
def inverse_cdf(probs, u):
    cdf = probs.cumsum(-1)
    # the first index whose cumulative probability exceeds u (clamped: rounding may leave cdf[-1] just below 1)
    return torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_max(probs.shape[-1] - 1)
