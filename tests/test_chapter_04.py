"""Chapter 04's build exercise: a FIFO eviction policy for the engine's block manager, run with no model and in
the engine, against the reader's notebook cell (``--lab notebook``) and the solution (``--lab solutions``)."""

from __future__ import annotations

import pytest
from conftest import attempted, make_tiny_model
from nbimport import load_chapter

from nanovllm.engine.block_manager import BlockManager

# hot_and_cold() through 12 blocks of 16: the hot prefix (48 tokens) is cached by request 0 and found by requests
# 2 and 4; FIFO then evicts it, though it was just used (LRU never does), and the pattern repeats every 6 requests
FIFO_12_BLOCKS = [0, 0, 48, 0, 48, 0] * 4
LRU_12_BLOCKS = [0, 0] + [48, 0] * 11


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from nanovllm import LLM

    path = tmp_path_factory.mktemp("tiny-llama-ch04")
    make_tiny_model("llama", path)
    return LLM(str(path), num_kvcache_blocks=64, max_num_seqs=4, dtype="float32", device="cpu")


def serve_one_by_one(llm, block_manager_cls, prompts, num_blocks):
    """Give the engine a new, empty block manager of ``block_manager_cls`` and a scheduler over it, then serve
    the prompts one after another; returns (cached prompt tokens, completion tokens) per request."""
    from nanovllm import SamplingParams
    from nanovllm.engine.scheduler import Scheduler

    llm.block_manager = block_manager_cls(num_blocks, llm.config.kvcache_block_size, True)
    llm.scheduler = Scheduler(llm.config, llm.block_manager)
    llm.overlapped = None  # (a GPU engine's overlapped loop holds the old scheduler)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    return [o.num_cached_tokens for o in outs], [o.token_ids for o in outs]


def check_fifo(ch, cls, llm):
    """What a FIFO block manager must do; raises AssertionError if ``cls`` does not."""
    assert issubclass(cls, BlockManager)
    bs = llm.config.kvcache_block_size
    prompts = ch.hot_and_cold(block_size=bs)
    assert ch.cached_per_request(BlockManager(12, bs), prompts) == LRU_12_BLOCKS  # the workload is what we think
    assert ch.cached_per_request(cls(12, bs), prompts) == FIFO_12_BLOCKS, "not FIFO with no model"
    cached, tokens = serve_one_by_one(llm, cls, prompts, num_blocks=12)
    assert cached == FIFO_12_BLOCKS, f"not FIFO in the engine: {cached}"
    _, lru_tokens = serve_one_by_one(llm, BlockManager, prompts, num_blocks=12)
    assert tokens == lru_tokens  # an eviction policy changes what is recomputed, never the tokens


def test_fifo_block_manager_in_the_engine(lab_code, tiny_llm):
    ch = load_chapter("04_prefix_caching", code=lab_code)
    with attempted(lab_code):
        check_fifo(ch, ch.FIFOBlockManager, tiny_llm)


def test_lru_fails_the_fifo_checks(tiny_llm):
    ch = load_chapter("04_prefix_caching")
    with pytest.raises(AssertionError, match="not FIFO"):
        check_fifo(ch, BlockManager, tiny_llm)


def test_workload_and_harness():
    ch = load_chapter("04_prefix_caching")
    prompts = ch.hot_and_cold(num_requests=4, block_size=4)
    assert prompts[0][:12] == prompts[2][:12] and prompts[1][:12] != prompts[0][:12]
    assert [len(p) for p in prompts] == [20] * 4
    assert ch.cached_per_request(BlockManager(16, 4), prompts) == [0, 0, 12, 0]


# -- the chapter's figures: each script runs and draws its PNG (in a copy of figures/, so the committed PNG stays) --
@pytest.mark.parametrize("name", ["fig_04_hash_chain", "fig_04_prefix_caching"])
def test_figure_script_runs(name, tmp_path):
    from conftest import run_figure_script

    run_figure_script(name, tmp_path)
