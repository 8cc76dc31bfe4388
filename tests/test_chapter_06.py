"""Chapter 06's build exercise: min-p as the engine's sampler's mask, the reader's (``--lab notebook``) and the
solution's (``--lab solutions``), against the package's ``apply_min_p`` and inside a real engine."""

from __future__ import annotations

import pytest
import torch
from conftest import attempted, make_tiny_model
from nbimport import load_chapter


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from nanovllm import LLM

    path = tmp_path_factory.mktemp("tiny-qwen3-ch06")
    make_tiny_model("qwen3", path)
    return LLM(str(path), num_kvcache_blocks=64, max_num_seqs=4, dtype="float32", device="cpu")


def check_min_p(ch, fn, llm):
    """min-p: the tokens ``apply_min_p`` keeps, per row, logits unchanged; in the engine, the same tokens."""
    from nanovllm import SamplingParams
    from nanovllm.layers.sampler import apply_min_p

    rows = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)) * 3
    m = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.3, 1.0])
    ours, theirs = fn(rows, m), apply_min_p(rows, m)
    assert torch.equal(ours.isfinite(), theirs.isfinite()), "not the tokens min-p keeps"
    assert torch.equal(ours[ours.isfinite()], theirs[theirs.isfinite()]), "kept logits changed"
    prompts = [[5, 17, 42], [7, 8, 9, 10], [300, 2, 99]]
    params = [SamplingParams(temperature=1.0, min_p=0.2, max_tokens=12, seed=s, ignore_eos=True) for s in range(3)]
    with ch.engine_min_p(fn):
        mine = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    package = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert mine == package, "other tokens in the engine"
    for p in params:
        p.min_p = 0.0
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] != package  # min-p matters here


def test_min_p_in_the_engine(lab_code, tiny_llm):
    ch = load_chapter("06_sampling", code=lab_code)
    with attempted(lab_code):
        check_min_p(ch, ch.min_p_mask, tiny_llm)


def test_a_mask_on_logits_instead_of_probabilities_fails(tiny_llm):
    ch = load_chapter("06_sampling")

    def on_logits(logits, min_p):  # the usual slip: a threshold on the logits, not on the probabilities
        return logits.masked_fill(logits < min_p[:, None] * logits.amax(-1, keepdim=True), float("-inf"))

    with pytest.raises(AssertionError, match="not the tokens"):
        check_min_p(ch, on_logits, tiny_llm)


def test_engine_min_p_restores_the_sampler(tiny_llm):
    from nanovllm.layers import sampler

    ch = load_chapter("06_sampling")
    original = sampler.apply_min_p
    with pytest.raises(RuntimeError), ch.engine_min_p(lambda logits, m: logits):
        assert sampler.apply_min_p is not original
        raise RuntimeError
    assert sampler.apply_min_p is original


# -- the chapter's figures: each script runs and draws its PNG (in a copy of figures/, so the committed PNG stays) --
@pytest.mark.parametrize("name", ["fig_06_sampling"])
def test_figure_script_runs(name, tmp_path):
    from conftest import run_figure_script

    run_figure_script(name, tmp_path)
