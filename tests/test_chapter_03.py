"""Chapter 03's lab: the build exercise (the slot mapping of a whole step) drives where the engine stores its keys
and values; with the reader's code (``--lab notebook``) or the solution's, the engine must compute its own tokens.
The chapter's from-scratch pieces are tested in tests/test_chapter_03_04.py."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import attempted
from nbimport import load_chapter

PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18]]


@pytest.fixture(scope="module")
def tiny_llm(tiny_qwen3):
    from nanovllm import LLM

    path, _ = tiny_qwen3
    llm = LLM(path, num_kvcache_blocks=12, kvcache_block_size=4, max_num_batched_tokens=16,
              enable_prefix_caching=False, enforce_eager=True, dtype="float32")
    yield llm
    llm.shutdown()


def runner_slots(llm, tables, computed, new):
    """The runner's slot mapping and metadata for sequences with these block tables, computed and new tokens."""
    from nanovllm.engine.sequence import ScheduledBatch, Sequence

    seqs = []
    for i, (table, c, n) in enumerate(zip(tables, computed, new)):
        seq = Sequence(1000 + i, list(range(c + n)))
        seq.block_table, seq.num_computed_tokens = table, c
        seqs.append(seq)
    _, _, meta, _ = llm.runner.prepare(ScheduledBatch(seqs, new, is_prefill=True))
    return meta


def check_against_the_runner(fn, llm):
    """``fn`` gives the runner's slot mapping for random batches (prefills, chunks after a cached prefix, decodes)."""
    rng = random.Random(0)
    bs = llm.config.kvcache_block_size
    for _ in range(5):
        n = rng.randint(1, 4)
        computed = [rng.randint(0, 20) for _ in range(n)]
        new = [rng.randint(1, 9) for _ in range(n)]
        ids = rng.sample(range(100), sum(-(-(c + q) // bs) for c, q in zip(computed, new)))
        tables = []
        for c, q in zip(computed, new):
            k = -(-(c + q) // bs)
            tables.append(ids[:k])
            del ids[:k]
        meta = runner_slots(llm, tables, computed, new)
        got = fn(meta.block_tables, meta.query_lens_cpu, meta.context_lens_cpu, bs)
        assert torch.is_tensor(got) and got.dtype == torch.int64
        assert got.tolist() == meta.slot_mapping.tolist()


def check_in_the_engine(fn, ch, llm):
    """The engine computes its own tokens when the attention layers store by ``fn``'s slots, not the runner's."""
    from nanovllm import SamplingParams

    class SlotsBackend(ch.ScratchBackend):  # the chapter's check: stores by fn's slots, not the runner's
        def __init__(self, slots_fn):
            self.slots_fn = slots_fn

        def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
            pass

        def forward(self, q, k, v, k_cache, v_cache, meta, scale):
            slots = self.slots_fn(meta.block_tables, meta.query_lens_cpu, meta.context_lens_cpu, k_cache.shape[1])
            ch.store_kv(k_cache, v_cache, k, v, slots)
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    before = llm.scheduler.num_preemptions
    expected = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    with ch.model_with_backend(llm, SlotsBackend(fn)):
        got = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert llm.scheduler.num_preemptions > before  # the tiny cache makes the engine preempt: recomputed prefixes
    assert got == expected


def test_batch_slot_mapping_stores_where_the_engine_reads(lab_code, tiny_llm):
    ch = load_chapter("03_paged_kv", code=lab_code)
    with attempted(lab_code):
        check_against_the_runner(ch.batch_slot_mapping, tiny_llm)
        check_in_the_engine(ch.batch_slot_mapping, ch, tiny_llm)


def test_a_wrong_slot_mapping_fails_both_checks(tiny_llm):
    ch = load_chapter("03_paged_kv", code="solutions")

    def from_position_zero(block_tables, query_lens, context_lens, block_size):  # forgets the cached prefix
        return ch.batch_slot_mapping(block_tables, query_lens, query_lens, block_size)

    with pytest.raises(AssertionError):
        check_against_the_runner(from_position_zero, tiny_llm)
    with pytest.raises(AssertionError):  # the engine alone notices: keys and values in the wrong slots
        check_in_the_engine(from_position_zero, ch, tiny_llm)
