"""Chapter 07's decode-mode measurement sizes itself to the card: ``decode_step_ms`` times only the batch sizes
whose requests fit in the engine's KV cache at once (and max_num_seqs), each as one whole batch."""

from __future__ import annotations

import pytest
from nbimport import load_chapter

from nanovllm import LLM


@pytest.fixture(scope="module")
def ch07():
    return load_chapter("07_cuda_graphs_and_compile")


@pytest.mark.parametrize("num_blocks,expected", [(20, [1, 4]), (24, [1, 4, 8]), (2, [])])
def test_decode_step_ms_times_the_batches_that_fit(ch07, tiny_qwen3, num_blocks, expected):
    # prompts of 32 tokens + 2 warm-up + 3 timed steps + 1: 3 blocks of 16 per request
    llm = LLM(str(tiny_qwen3[0]), device="cpu", dtype="float32", num_kvcache_blocks=num_blocks, max_num_seqs=8,
              max_num_batched_tokens=64, max_model_len=128)  # 64-token prefill steps: several before the decode
    try:
        result = ch07.decode_step_ms(llm, (1, 4, 8, 64), prompt_len=32, warmup=2, steps=3)
        assert sorted(result) == expected  # 64 > max_num_seqs; the rest as the cache allows
        assert all(ms > 0 for ms in result.values())
        assert not llm.scheduler.has_unfinished()
        assert llm.block_manager.num_free_blocks == num_blocks
    finally:
        llm.shutdown()
