# Solutions to chapter 13's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (propose_ngram, puzzle, ...).

# %% exercise 1
def expected_tokens_per_step():
    # 1 + a + a^2 + ... + a^k: the step emits token j + 1 only if drafts 1..j were all kept
    alpha, k = 0.6, 4
    return (1 - alpha ** (k + 1)) / (1 - alpha)


# %% exercise 2
def drafts_by_n_max():
    # n_max=2: the suffix "2 3" occurred at 0, followed by 6 6 1.  n_max=1: the suffix "3" occurred at 1 and 5;
    # the latest with 3 tokens after it is at 5, followed by 8 1 2
    return propose_ngram(puzzle, 3, n_max=2), propose_ngram(puzzle, 3, n_max=1)


# %% exercise 3
def keep_and_residual():
    p, q = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]
    keep = min(1.0, p[2] / q[2])  # 0.2 / 0.6
    residual = [max(0.0, a - b) for a, b in zip(p, q)]  # [0.3, 0.1, 0]
    return keep, [r / sum(residual) for r in residual]
