"""Captured prefill steps (``PrefillGraphs``): a short prefill runs padded to a bucket of tokens and of
sequences.  On a CPU nothing is captured, but the padded step runs eagerly through the same static
buffers and the same Triton kernels (Triton's interpreter, TRITON_INTERPRET=1, set below before the
kernels are defined), so the padding itself is checked here: the real tokens' hidden states and the KV
cache must equal the unpadded step's, and the engine's tokens HF's."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before the @triton.jit functions are created

from conftest import interpreted_triton_kernels  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.engine.cuda_graphs import (  # noqa: E402
    PREFILL_GRAPH_MAX_SEQS,
    PREFILL_GRAPH_MAX_TOKENS,
    PrefillGraphs,
    fill_prefill_inputs,
    graph_token_sizes,
)
from nanovllm.engine.model_runner import sampling_rows  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module")
def triton_kernels():
    return interpreted_triton_kernels()


def test_graph_token_sizes():
    assert graph_token_sizes(8192) == [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, PREFILL_GRAPH_MAX_TOKENS]
    assert graph_token_sizes(100) == [16, 32, 64, 100]  # the step's limit is the top bucket
    assert graph_token_sizes(16) == [16]
    assert graph_token_sizes(5) == [5]
    sizes = graph_token_sizes(4096)
    assert sizes == sorted(set(sizes))
    # past 256 tokens, the next bucket is at most a half larger: a step pads at most a third of its tokens
    assert all(b <= 1.5 * a for a, b in zip(sizes, sizes[1:]) if a >= 256)


def _batch(llm, lengths, seed, chunk_first=False):
    """A scheduled prefill batch of prompts with these lengths (random ids).  ``chunk_first``: compute the
    first prompt's first half in an earlier step, so this batch continues it over a cached prefix."""
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    if chunk_first:
        first = llm.add_request(torch.randint(0, 500, (lengths[0],), generator=gen).tolist(), params)
        half = lengths[0] // 2
        batch = llm.scheduler.schedule()
        assert batch.seqs == [first]
        batch.num_new_tokens = [half]  # as if the step's token budget had cut the prompt here
        llm.runner.run(batch)
        llm.scheduler.postprocess(batch, [])
        assert first.num_computed_tokens == half
        lengths = lengths[1:]
    for n in lengths:
        llm.add_request(torch.randint(0, 500, (n,), generator=gen).tolist(), params)
    batch = llm.scheduler.schedule()
    assert batch.is_prefill
    return batch


def test_fill_prefill_inputs_equals_prepare(tiny_qwen3):
    """The padded step's host arrays hold what the eager step's ``prepare`` computes, then padding."""
    folder, _ = tiny_qwen3
    llm = LLM(folder, device="cpu", dtype=torch.float32, attention_backend="torch", kvcache_block_size=4,
              num_kvcache_blocks=64)
    try:
        batch = _batch(llm, [9, 5, 13], seed=1, chunk_first=True)
        ids, positions, meta, rows = llm.runner.prepare(batch)
        n, s, t, width = int(ids.numel()), 6, 40, 16
        ints = np.full((3, t), 7, dtype=np.int64)
        lens = np.full(2 * s + 1, 7, dtype=np.int32)
        tables = np.full((s, width), 7, dtype=np.int32)
        fill_prefill_inputs(batch.seqs, batch.num_new_tokens, 4, ints, lens, tables)
        k = len(batch.seqs)
        assert np.array_equal(ints[0, :n], ids.numpy()) and np.array_equal(ints[1, :n], positions.numpy())
        assert np.array_equal(ints[2, :n], meta.slot_mapping.numpy())
        assert (ints[:2, n:] == 0).all() and (ints[2, n:] == -1).all()  # padding tokens store nothing
        cu_q = meta.cu_seqlens_q.numpy()
        assert np.array_equal(lens[:k + 1], cu_q) and (lens[k + 1:s + 1] == n).all()  # padding: no new tokens
        assert np.array_equal(lens[s + 1:s + 1 + k], meta.context_lens.numpy()) and (lens[s + 1 + k:] == 0).all()
        for i, seq in enumerate(batch.seqs):
            assert list(tables[i, :len(seq.block_table)]) == seq.block_table
        assert sampling_rows(batch) == rows
    finally:
        llm.abort_all()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_padded_prefill_equals_the_eager_step(arch, tmp_path, triton_kernels):
    """Through the Triton kernels: a prefill of three prompts (one over a cached prefix), padded to a
    bucket of 32 tokens and 16 sequences, gives the eager step's hidden states for the real tokens and
    stores the same K/V in the cache, and nothing anywhere else."""
    from conftest import make_tiny_model

    make_tiny_model(arch, tmp_path)
    llm = LLM(tmp_path, device=DEVICE, dtype=torch.float32, attention_backend="triton", enforce_eager=True,
              kvcache_block_size=4, num_kvcache_blocks=64)
    runner = llm.runner
    try:
        batch = _batch(llm, [10, 7, 3], seed=2, chunk_first=True)
        n = sum(batch.num_new_tokens)
        assert n == 15 and batch.seqs[0].num_computed_tokens == 5
        before = runner.kv_cache.clone()
        with torch.inference_mode():
            ids, positions, meta, _ = runner.prepare(batch)
            eager = runner.model(ids, positions, meta).clone()
        eager_cache = runner.kv_cache.clone()
        runner.kv_cache.copy_(before)
        graphs = PrefillGraphs(runner.model, 32, 64, llm.config.max_model_len, 4, llm.hf_config.hidden_size,
                               torch.float32, runner.device)
        assert graphs.token_sizes == [16, 32] and graphs.max_seqs == PREFILL_GRAPH_MAX_SEQS
        graphs.hidden.fill_(float("nan"))
        padded = graphs.run(batch)
        assert padded.shape == eager.shape
        torch.testing.assert_close(padded, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runner.kv_cache, eager_cache, atol=1e-6, rtol=1e-6)
        assert not torch.equal(eager_cache, before)  # (the step did store something)
    finally:
        llm.abort_all()


def test_engine_with_padded_prefills_gives_hf_tokens(tiny_qwen3, triton_kernels):
    """The engine's step path with prefill graphs in place (run eagerly on a CPU): short prompts in one
    padded step, a prompt chunked over two steps, greedy tokens equal HF's."""
    from conftest import hf_greedy

    folder, model = tiny_qwen3
    llm = LLM(folder, device=DEVICE, dtype=torch.float32, attention_backend="triton", enforce_eager=True,
              kvcache_block_size=4, max_num_batched_tokens=24)
    runner = llm.runner
    if runner.prefill_graphs is None:  # a CPU (or enforce_eager): put the padded path in by hand
        runner.prefill_graphs = PrefillGraphs(runner.model, 24, llm.config.max_num_seqs, llm.config.max_model_len,
                                              4, llm.hf_config.hidden_size, torch.float32, runner.device)
    calls = []
    run = runner.prefill_graphs.run
    runner.prefill_graphs.run = lambda batch: calls.append(sum(batch.num_new_tokens)) or run(batch)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 11, 30)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 5) for p in prompts]
    assert calls and sum(calls) == 46 and max(calls) <= 24  # every prompt token went through the padded path
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
