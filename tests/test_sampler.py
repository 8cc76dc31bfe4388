"""The sampler: greedy, top-k, top-p against an independent numpy implementation, temperature against the
distribution softmax(logits / T) predicts, and per-request seeds (in the sampler and through LLM.generate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.layers.sampler import apply_top_k_top_p, sample

torch.set_num_threads(1)  # tiny models: one thread is fastest, and more spin badly on a busy machine


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def np_top_k_keep(logits, k):
    """Boolean mask of the k largest logits (k <= 0: all)."""
    v = len(logits)
    keep = np.zeros(v, dtype=bool)
    keep[np.argsort(-np.asarray(logits, dtype=np.float64), kind="stable")[:k if k > 0 else v]] = True
    return keep


def np_top_p_keep(logits, p, base=None):
    """The smallest set of most likely tokens whose probability reaches p (among ``base`` if given)."""
    logits = np.asarray(logits, dtype=np.float64)
    if base is not None:
        logits = np.where(base, logits, -np.inf)
    probs = np_softmax(logits)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n = min(int(np.searchsorted(cum, p, side="left")) + 1, len(logits))
    keep = np.zeros(len(logits), dtype=bool)
    keep[order[:n]] = True
    return keep, cum


def chi_square(counts, probs):
    expected = probs * counts.sum()
    nz = expected > 0
    assert counts[~nz].sum() == 0, "drew a token of probability 0"
    return float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())


CHI2_CRIT_DF5 = 25.7  # chi-square, 5 degrees of freedom, p = 1e-4


# -- greedy -----------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 100, generator=g) * 3
    out = sample(logits, torch.zeros(8))
    assert out.tolist() == np.argmax(logits.numpy(), axis=1).tolist()


def test_greedy_ignores_top_k_top_p_and_noise():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g)
    out = sample(logits, torch.zeros(4), torch.tensor([1, 2, 3, 4]), torch.tensor([0.1, 0.5, 0.9, 1.0]),
                 default_generator=torch.Generator().manual_seed(5))
    assert out.tolist() == logits.argmax(-1).tolist()


def test_greedy_rows_in_a_mixed_batch_stay_argmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 30, generator=g)
    temps = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.7])
    for seed in range(20):
        out = sample(logits, temps, default_generator=torch.Generator().manual_seed(seed))
        assert out[[0, 2, 4]].tolist() == logits[[0, 2, 4]].argmax(-1).tolist()


@pytest.mark.parametrize("temp", [1e-3, 1e-8, 1e-30, 1e-40, 1e-44])
def test_tiny_temperature_samples_the_argmax(temp):
    """As T -> 0 sampling becomes greedy; a subnormal T must not overflow the logits into NaN."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(16, 40, generator=g) * 4
    out = sample(logits, torch.full((16,), temp), default_generator=torch.Generator().manual_seed(1))
    assert out.tolist() == logits.argmax(-1).tolist()


def test_greedy_half_precision_logits():
    logits = torch.tensor([[0.0, 1.5, 1.0, -2.0]], dtype=torch.bfloat16)
    assert sample(logits, torch.zeros(1)).tolist() == [1]


# -- top-k / top-p masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 17, 64, 0, -1, 1000])
def test_top_k_keeps_exactly_the_k_largest(k):
    g = torch.Generator().manual_seed(k + 10)
    logits = torch.randn(5, 64, generator=g)
    masked = apply_top_k_top_p(logits, torch.full((5,), k), None)
    for row, m in zip(logits.numpy(), masked.numpy()):
        keep = np.isfinite(m)
        assert keep.sum() == (min(k, 64) if k > 0 else 64)
        assert (keep == np_top_k_keep(row, k)).all()
        assert np.array_equal(m[keep], row[keep])  # kept logits unchanged


def test_top_k_per_row():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 20, generator=g)
    ks = [1, 3, -1, 7]
    masked = apply_top_k_top_p(logits, torch.tensor(ks), None)
    for row, m, k in zip(logits.numpy(), masked.numpy(), ks):
        assert (np.isfinite(m) == np_top_k_keep(row, k)).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        v = int(rng.integers(2, 80))
        row = rng.normal(0, rng.uniform(0.3, 4), size=v).astype(np.float32)
        p = float(rng.uniform(0.01, 0.999))
        keep, cum = np_top_p_keep(row, p)
        if np.min(np.abs(cum - p)) < 1e-5:
            continue  # too close to a boundary for float32 to agree with float64
        masked = apply_top_k_top_p(torch.from_numpy(row)[None], None, torch.tensor([p])).numpy()[0]
        assert (np.isfinite(masked) == keep).all(), (trial, p)
        checked += 1
    assert checked > 150


def test_top_p_rows_differ_and_one_is_off():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 40, generator=g) * 2
    ps = [0.3, 1.0, 0.8]
    masked = apply_top_k_top_p(logits, None, torch.tensor(ps)).numpy()
    for row, m, p in zip(logits.numpy(), masked, ps):
        assert (np.isfinite(m) == np_top_p_keep(row, p)[0]).all()
    assert np.isfinite(masked[1]).all()


def test_top_p_of_one_keeps_everything_even_when_the_cumsum_rounds_to_one():
    """With a dominant token the float32 cumulative sum hits 1.0 right away; top_p=1 must still keep all
    tokens (it is "off"), as it does when no row of the batch uses top-p."""
    logits = torch.tensor([[30.0] + [0.0] * 9, [0.0] * 10])
    masked = apply_top_k_top_p(logits, None, torch.tensor([1.0, 0.5]))
    assert torch.isfinite(masked[0]).all()
    assert torch.isfinite(masked[1]).sum() == 5


def test_top_p_always_keeps_the_best_token():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    masked = apply_top_k_top_p(logits, None, torch.tensor([1e-6]))
    assert torch.isfinite(masked).tolist() == [[True, False, False, False]]


def test_top_k_then_top_p():
    rng = np.random.default_rng(1)
    for _ in range(50):
        row = rng.normal(0, 2, size=30).astype(np.float32)
        k, p = int(rng.integers(1, 30)), float(rng.uniform(0.05, 0.99))
        base = np_top_k_keep(row, k)
        keep, cum = np_top_p_keep(row, p, base)
        if np.min(np.abs(cum - p)) < 1e-5:
            continue
        masked = apply_top_k_top_p(torch.from_numpy(row)[None], torch.tensor([k]), torch.tensor([p])).numpy()[0]
        assert (np.isfinite(masked) == keep).all()


# -- distributions ----------------------------------------------------------------------------------

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -2.0]
N = 6000


def draw(temp, top_k=None, top_p=None, seed=0, logits=LOGITS):
    rows = torch.tensor(logits).repeat(N, 1)
    out = sample(rows, torch.full((N,), float(temp)),
                 None if top_k is None else torch.full((N,), top_k),
                 None if top_p is None else torch.full((N,), float(top_p)),
                 default_generator=torch.Generator().manual_seed(seed))
    return np.bincount(out.numpy(), minlength=len(logits))


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(temp):
    counts = draw(temp, seed=int(temp * 10))
    assert chi_square(counts, np_softmax(np.array(LOGITS) / temp)) < CHI2_CRIT_DF5
    for other in (0.5, 1.0, 2.0):  # and the test can tell temperatures apart
        if other != temp:
            assert chi_square(counts, np_softmax(np.array(LOGITS) / other)) > 10 * CHI2_CRIT_DF5


def test_top_k_distribution():
    counts = draw(1.0, top_k=3, seed=11)
    probs = np_softmax(np.where(np_top_k_keep(LOGITS, 3), LOGITS, -np.inf))
    assert counts[3:].sum() == 0
    assert chi_square(counts, probs) < CHI2_CRIT_DF5


def test_top_p_distribution():
    keep, _ = np_top_p_keep(LOGITS, 0.8)
    counts = draw(1.0, top_p=0.8, seed=12)
    probs = np_softmax(np.where(keep, LOGITS, -np.inf))
    assert counts[~keep].sum() == 0 and keep.sum() < len(LOGITS)
    assert chi_square(counts, probs) < CHI2_CRIT_DF5


def test_default_generator_is_reproducible():
    assert (draw(1.0, seed=3) == draw(1.0, seed=3)).all()
    assert (draw(1.0, seed=3) != draw(1.0, seed=4)).any()


# -- per-request seeds ------------------------------------------------------------------------------


def seeded_tokens(batch_logits, row, seed, steps=30, others_seed=0, temps=None):
    """The tokens row ``row`` draws over ``steps`` calls, its generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    default = torch.Generator().manual_seed(others_seed)
    n = batch_logits.shape[0]
    temps = torch.ones(n) if temps is None else temps
    out = []
    for _ in range(steps):
        gens = [None] * n
        gens[row] = g
        out.append(int(sample(batch_logits, temps, generators=gens, default_generator=default)[row]))
    return out


def test_seeded_row_ignores_the_rest_of_the_batch():
    g = torch.Generator().manual_seed(7)
    mine = torch.randn(1, 50, generator=g)
    alone = seeded_tokens(mine, 0, seed=123)
    others = torch.randn(5, 50, generator=g)
    batch = torch.cat([others[:2], mine, others[2:]])
    assert seeded_tokens(batch, 2, seed=123, others_seed=99) == alone
    assert seeded_tokens(batch, 2, seed=123, others_seed=5, temps=torch.tensor([0, 2, 1, 0.5, 0, 1.0])) == alone
    assert seeded_tokens(mine, 0, seed=124) != alone  # a different seed draws differently


def test_seeded_rows_with_other_seeded_rows():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 40, generator=g)
    alone = seeded_tokens(logits[1:2], 0, seed=5)
    ga, gb, gc = (torch.Generator().manual_seed(s) for s in (1, 5, 9))
    got = []
    for _ in range(30):
        got.append(int(sample(logits, torch.ones(3), generators=[ga, gb, gc])[1]))
    assert got == alone


# -- per-request seeds through the engine -----------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    from nanovllm import LLM

    path, _ = tiny_qwen3
    return LLM(str(path), max_model_len=256, num_kvcache_blocks=64)


def test_seed_gives_the_same_tokens_whatever_else_is_in_the_batch(llm):
    from nanovllm import SamplingParams

    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 512, size=12).tolist()
    others = [rng.integers(0, 512, size=int(n)).tolist() for n in (3, 20, 40)]
    seeded = SamplingParams(temperature=1.5, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    assert len(alone) == 20
    params = [SamplingParams(temperature=1.0, max_tokens=25, ignore_eos=True),
              seeded,
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=5, seed=99, max_tokens=30, ignore_eos=True),
              seeded]
    outs = llm.generate([others[0], prompt, others[1], others[2], prompt], params, use_tqdm=False)
    assert outs[1].token_ids == alone
    assert outs[4].token_ids == alone  # the same seed twice in one batch
    again = llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    assert again == alone  # and once more, with the prompt now in the prefix cache
    other_seed = SamplingParams(temperature=1.5, top_p=0.95, seed=4321, max_tokens=20, ignore_eos=True)
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0].token_ids != alone
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_unseeded_sampling_varies_between_calls(llm):
    from nanovllm import SamplingParams

    prompt = list(range(5, 17))
    p = SamplingParams(temperature=1.5, max_tokens=20, ignore_eos=True)
    a = llm.generate([prompt], p, use_tqdm=False)[0].token_ids
    b = llm.generate([prompt], p, use_tqdm=False)[0].token_ids
    assert a != b
