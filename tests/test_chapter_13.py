"""Chapter 13 (speculative decoding): the chapter's proposer, greedy acceptance, verify step and rejection
sampler agree with nanovllm's (``engine/spec_decode.py``); the verify step by hand reproduces the engine's
tokens without speculation; the rejection sampler keeps the target's distribution; the exercises' solutions
give the numbers the text states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from nbimport import load_chapter

from nanovllm import LLM, SamplingParams
from nanovllm.engine import spec_decode

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ch13():
    return load_chapter("13_speculative_decoding")


def test_propose_ngram_matches_package(ch13):
    rng = np.random.default_rng(1)
    for _ in range(1000):
        seq = rng.integers(0, int(rng.integers(2, 6)), rng.integers(1, 40)).tolist()
        k, n_max = int(rng.integers(0, 7)), int(rng.integers(1, 5))
        n_min = int(rng.integers(1, n_max + 1))
        assert ch13.propose_ngram(seq, k, n_max, n_min) == spec_decode.ngram_propose(seq, k, n_max, n_min)


def test_greedy_accept_matches_package(ch13):
    rng = np.random.default_rng(2)
    for _ in range(500):
        k = int(rng.integers(0, 5))
        drafts = rng.integers(0, 3, k).tolist()
        target = rng.integers(0, 3, k + 1).tolist()
        assert ch13.greedy_accept(target, drafts) == spec_decode.accept_greedy(target, drafts)


def test_verify_step_by_hand_gives_the_engine_tokens(ch13, tmp_path):
    make_tiny_model("qwen3", tmp_path)
    rng = np.random.default_rng(3)
    motif = rng.integers(0, 512, 6).tolist()
    prompt = rng.integers(0, 512, 3).tolist() + motif * 3
    llm = LLM(str(tmp_path), num_kvcache_blocks=64, kvcache_block_size=4, max_model_len=128)
    want = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].token_ids
    # the chapter's verify step, with drafts from the true continuation mixed with wrong ones
    seq = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    llm.step()
    from nanovllm.engine.sequence import ScheduledBatch

    while not seq.is_finished:
        done = seq.num_completion_tokens
        k = min(3, llm.scheduler.draft_room(seq))
        drafts = list(want[done:done + k])
        if done % 2 and drafts:
            drafts[-1] = (drafts[-1] + 1) % 512  # a wrong last draft: rejected
        tokens = ch13.verify_step(llm, seq, drafts)
        llm.scheduler.postprocess_verified(ScheduledBatch([seq], [1 + len(drafts)], True, [drafts]), [tokens])
        if not seq.is_finished:
            llm.block_manager.trim(seq)
    assert seq.completion_token_ids == want
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sample_keeps_the_distribution(ch13, point_mass):
    g = torch.Generator().manual_seed(0)
    vocab = 5
    p_chain = (torch.randn(vocab + 1, vocab, generator=g) * 1.5).softmax(-1)
    q_chain = (torch.randn(vocab + 1, vocab, generator=g) * 0.5).softmax(-1)
    exact = p_chain[vocab].unsqueeze(1) * p_chain[:vocab]
    joint = ch13.joint_of_two(ch13.rejection_sample, p_chain, q_chain, 8000, seed=1, point_mass=point_mass)
    assert 0.5 * float((joint - exact).abs().sum()) < 0.03
    # a sampler that keeps every draft is far off: the test can tell
    keep_all = lambda p, d, q, gen: d  # noqa: E731
    joint = ch13.joint_of_two(keep_all, p_chain, q_chain, 2000, seed=1, point_mass=point_mass)
    assert 0.5 * float((joint - exact).abs().sum()) > 0.1


def test_solutions():
    from nanovllm.lab import solution_blocks

    ch13 = load_chapter("13_speculative_decoding")
    ns = dict(vars(ch13), puzzle=[2, 3, 6, 6, 1, 3, 8, 1, 2, 3])
    blocks = solution_blocks("13")
    for block in blocks.values():
        exec(block, ns)
    assert ns["expected_tokens_per_step"]() == pytest.approx(2.3056)
    assert ns["drafts_by_n_max"]() == ([6, 6, 1], [8, 1, 2])
    keep, residual = ns["keep_and_residual"]()
    assert keep == pytest.approx(1 / 3) and residual == pytest.approx([0.75, 0.25, 0.0])
