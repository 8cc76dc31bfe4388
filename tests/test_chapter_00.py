"""Chapter 00 (quickstart): the HF baseline it times against nanovllm computes the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from nbimport import load_chapter


@pytest.fixture(scope="module")
def ch00():
    return load_chapter("00_quickstart")


def test_hf_batched_generate_matches_nanovllm(ch00, tiny_model):
    arch, path, hf_model = tiny_model
    from nanovllm import LLM, SamplingParams

    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13], [300, 2, 99, 1, 44]]  # different lengths: left padding
    n = 8
    hf_tokens = ch00.hf_batched_generate(hf_model, prompts, n, pad_token_id=0)
    assert [len(t) for t in hf_tokens] == [n] * len(prompts)
    llm = LLM(str(path), num_kvcache_blocks=32, dtype="float32", device="cpu")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    eos = set(llm.config.eos_token_ids)
    for out, hf in zip(outs, hf_tokens):
        # HF suppresses end-of-sequence until max_new_tokens (min_new_tokens); compare up to nanovllm's first one
        cut = next((i for i, t in enumerate(out.token_ids) if t in eos), n)
        assert out.token_ids[:cut] == hf[:cut]


def test_hf_batched_generate_left_padding_is_invisible(ch00, tiny_model):
    _, _, hf_model = tiny_model
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13]]
    together = ch00.hf_batched_generate(hf_model, prompts, 6)
    alone = [ch00.hf_batched_generate(hf_model, [p], 6)[0] for p in prompts]
    assert together == alone
    assert torch.is_grad_enabled()  # the function's inference_mode does not leak
