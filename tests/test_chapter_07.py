"""Chapter 07's build exercise: decode steps in buckets (a GraphedDecode per bucket, padding to the smallest that
holds the batch), the reader's (``--lab notebook``) and the solution's (``--lab solutions``), on a real engine's
model against its eager step."""

from __future__ import annotations

import pytest
import torch
from conftest import attempted, make_tiny_model
from nbimport import load_chapter


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from nanovllm import LLM

    path = tmp_path_factory.mktemp("tiny-llama-ch07")
    make_tiny_model("llama", path)
    return LLM(str(path), num_kvcache_blocks=64, max_num_seqs=8, dtype="float32", device="cpu", enforce_eager=True)


def decode_batch(llm, n, seed):
    """n requests brought to their first decode step; returns the decode batch (abort_all() when done)."""
    import random

    from nanovllm import SamplingParams

    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for _ in range(n):
        llm.add_request([rng.randint(0, 500) for _ in range(rng.randint(3, 40))], params)
    assert llm.step()[0].is_prefill
    return llm.scheduler.schedule()


def check_buckets(cls, llm):
    """Buckets [1, 2, 4, 8]: each batch size runs in the smallest bucket that holds it and gives the eager step's
    hidden states."""
    from nanovllm.utils import cdiv

    cfg, bs = llm.hf_config, llm.config.kvcache_block_size
    step = cls(llm.runner.model, [1, 2, 4, 8], cdiv(llm.config.max_model_len, bs), cfg.hidden_size,
               llm.config.max_model_len, llm.dtype, llm.device)
    assert sorted(step.steps) == [1, 2, 4, 8]
    assert [step.bucket_for(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8], "not the smallest bucket"
    with pytest.raises(ValueError):
        step.bucket_for(9)
    for n in (5, 1, 3):
        batch = decode_batch(llm, n, seed=n)
        ids, positions, meta, _ = llm.runner.prepare(batch)
        with torch.inference_mode():
            eager = llm.runner.model(ids, positions, meta).clone()
        ours = step(batch.seqs, bs)
        llm.abort_all()
        assert ours.shape == eager.shape
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
        bucket = step.steps[step.bucket_for(n)]
        assert bucket.input_ids[:n].tolist() == [s.token_ids[-1] for s in batch.seqs]  # it ran in its bucket
        assert (bucket.slot_mapping[n:] == -1).all()  # the padding rows store nothing


def test_bucketed_decode_on_the_engines_model(lab_code, tiny_llm):
    ch = load_chapter("07_cuda_graphs_and_compile", code=lab_code)
    with attempted(lab_code):
        check_buckets(ch.BucketedDecode, tiny_llm)


def test_the_largest_bucket_for_everything_fails(tiny_llm):
    ch = load_chapter("07_cuda_graphs_and_compile", code="solutions")

    class AlwaysLargest(ch.BucketedDecode):  # correct hidden states, but every batch pays for the largest bucket
        def bucket_for(self, n):
            return max(self.steps)

    with pytest.raises(AssertionError, match="not the smallest bucket"):
        check_buckets(AlwaysLargest, tiny_llm)


# -- the chapter's figures: each script runs and draws its PNG (in a copy of figures/, so the committed PNG stays) --
@pytest.mark.parametrize("name", ["fig_07_overlap"])
def test_figure_script_runs(name, tmp_path):
    from conftest import run_figure_script

    run_figure_script(name, tmp_path)
