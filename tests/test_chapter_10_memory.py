"""Chapter 10's memory planning and its cache-aware floor: the parameter count is the models' (HF's and the
engine's), the KV sizes are the engine's, the budget and block count are the package's functions, and the floor
is a true lower bound on the steps the real scheduler takes with a small cache."""

from __future__ import annotations

import json
import random

import pytest
import torch
from nbimport import load_chapter

from nanovllm import LLM, SamplingParams, bench
from nanovllm.config import EngineConfig
from nanovllm.engine import model_runner
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.loading.embedded import embedded_model_dir

GiB = 1 << 30


@pytest.fixture(scope="module")
def ch10():
    return load_chapter("10_benchmark")


def qwen3():
    return json.loads(bench.QWEN3_0_6B_CONFIG.read_text())


def smollm2():
    return json.loads((embedded_model_dir() / "config.json").read_text())


def hf_param_count(cfg: dict) -> int:
    import transformers

    skip = ("architectures", "torch_dtype", "dtype", "_model_name_or_path", "transformers_version")
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in skip})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    return sum(p.numel() for p in model.parameters())


# -- the estimate's pieces against the models ------------------------------------------------------------
@pytest.mark.parametrize("cfg", [qwen3(), smollm2(),
                                 dict(smollm2(), tie_word_embeddings=False),
                                 dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      tie_word_embeddings=False)],
                         ids=["qwen3-0.6b", "smollm2-135m", "llama-untied", "qwen2-tiny"])
def test_param_count_is_hf_transformers(ch10, cfg):
    assert ch10.param_count(cfg) == hf_param_count(cfg)


def test_param_count_and_kv_block_are_the_engines(ch10, tiny_model):
    arch, path, _ = tiny_model
    cfg = json.loads((path / "config.json").read_text())
    llm = LLM(str(path), device="cpu", dtype="float32", max_num_seqs=2, max_model_len=64)
    try:
        runner = llm.runner
        assert sum(p.numel() for p in runner.model.parameters()) == ch10.param_count(cfg)
        block = llm.config.kvcache_block_size
        assert runner.kv_bytes_per_block() == block * ch10.kv_bytes_per_token(cfg, 4)
        assert runner.kv_cache.nbytes == llm.block_manager.num_blocks * block * ch10.kv_bytes_per_token(cfg, 4)
    finally:
        llm.shutdown()


def test_known_sizes(ch10):
    q, s = qwen3(), smollm2()
    assert ch10.kv_bytes_per_token(q) == 28 * 2 * 8 * 128 * 2 and ch10.kv_bytes_per_token(s) == 30 * 2 * 3 * 64 * 2
    assert ch10.param_count(q) == 596_049_920 and ch10.param_count(s) == 134_515_008
    # the prefill's activations: the MLP half is the wider one for both (3 x intermediate per token)
    assert ch10.activation_bytes(q, 100) == 100 * (2 * 1024 + 3 * 3072) * 2
    assert ch10.after_cache_bytes(q, 256) == ch10.activation_bytes(q, 256) + 256 * 151_936 * 2


def test_plan_memory(ch10):
    q = qwen3()
    plans = {gib: ch10.plan_memory(gib * GiB, q) for gib in (1, 4, 8, 16, 80)}
    for gib, plan in plans.items():
        used = ch10.CUDA_CONTEXT + plan["weights"] + plan["activations"] + plan["kv_cache"]
        assert plan["kv_cache"] == 0 or used == int(0.9 * gib * GiB)
        assert plan["kv_tokens"] == plan["kv_cache"] // ch10.kv_bytes_per_token(q)
    assert plans[1]["kv_cache"] == 0  # 0.9 GiB less the context and 1.2 GB of weights: nothing left
    tokens = [plans[g]["kv_tokens"] for g in (4, 8, 16, 80)]
    assert tokens == sorted(tokens)
    # the full seed benchmark (276,793 tokens at once) fits the 80 GiB card only
    prompts, outs = ch10.seed_workload()
    need = sum(map(len, prompts)) + sum(outs)
    assert plans[80]["kv_tokens"] > need > plans[16]["kv_tokens"]
    # other processes' memory comes out of the cache
    squeezed = ch10.plan_memory(8 * GiB, q, others=3 * GiB)
    assert squeezed["kv_cache"] == plans[8]["kv_cache"] - (3 * GiB - ch10.CUDA_CONTEXT)


def test_budget_and_blocks_are_the_packages(ch10):
    rng = random.Random(0)
    for _ in range(300):
        total = rng.choice([4, 8, 16, 80]) * GiB
        reserved = rng.randrange(0, total // 2)
        free = rng.randrange(0, total - reserved)
        peak = rng.randrange(0, reserved + 1)
        util = rng.choice([0.1, 0.5, 0.9, 1.0])
        budget = ch10.gpu_budget(total, free, reserved, peak, util)
        assert budget == model_runner.gpu_kv_budget(total, free, reserved, peak, util)
        per_block = rng.choice([16, 256]) * rng.choice([23_040, 114_688])
        seqs, length, block = rng.randint(1, 256), rng.randint(2, 8192), rng.choice([16, 256])
        config = EngineConfig(max_num_seqs=seqs, max_model_len=length)
        assert ch10.kv_blocks(budget, per_block, seqs, length, block) == model_runner.kv_cache_blocks(
            budget, per_block, config, block)


def test_the_engines_blocks_follow_the_formula(ch10, tiny_qwen3, monkeypatch):
    """On a CPU, as the chapter checks: the blocks come from the budget the engine computed, under the cap."""
    calls = []
    original = model_runner.cpu_kv_budget
    monkeypatch.setattr(model_runner, "cpu_kv_budget", lambda a: calls.append(original(a)) or calls[-1])
    for seqs, length in [(4, 100), (256, 1024)]:
        llm = LLM(str(tiny_qwen3[0]), device="cpu", dtype="float32", max_num_seqs=seqs, max_model_len=length)
        try:
            cfg = json.loads((tiny_qwen3[0] / "config.json").read_text())
            per_block = 16 * ch10.kv_bytes_per_token(cfg, 4)
            assert llm.block_manager.num_blocks == ch10.kv_blocks(calls[-1], per_block, seqs, length, 16)
        finally:
            llm.shutdown()


# -- the floor with a small cache --------------------------------------------------------------------------
def test_floor_counts_the_steps_a_small_cache_forces(ch10):
    # 4 requests: prompts of 10, outputs of 5 -> decode reads 4 x (4 x 10 + 1 + 2 + 3 + 4) = 200 tokens
    assert ch10.decode_floor_bytes([10] * 4, [5] * 4, 1, 1) == (200, 4)
    assert ch10.decode_floor_bytes([10] * 4, [5] * 4, 1, 1, cache_tokens=60) == (200, 4)  # roomy: max(o) - 1
    assert ch10.decode_floor_bytes([10] * 4, [5] * 4, 1, 1, cache_tokens=20) == (200, 10)  # 200 / 20
    assert ch10.decode_floor_bytes([10] * 4, [5] * 4, 1, 1, max_batch=1) == (200, 16)  # one at a time
    # the seed benchmark on Qwen3-0.6B: an 80 GB cache changes nothing; 50,000 tokens need 2,414 steps
    prompts, outs = ch10.seed_workload()
    lens, q = list(map(len, prompts)), qwen3()
    w = ch10.weight_bytes(q)
    assert ch10.decode_floor_bytes(lens, outs, 1, w) == ch10.decode_floor_bytes(lens, outs, 1, w, 657_400, 256)
    kv_tokens, _ = ch10.decode_floor_bytes(lens, outs, 1, w)
    assert ch10.decode_floor_bytes(lens, outs, 1, w, 50_000)[1] == -(-kv_tokens // 50_000) * w


def scheduled_steps(prompt_lens, output_lens, num_blocks, block_size=16, max_num_seqs=256):
    """Steps the real scheduler takes for the requests (ignore_eos) with a cache of num_blocks, a model that
    always answers token 0, and no prefix caching (the floor's condition: requests share nothing)."""
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048, kvcache_block_size=block_size)
    scheduler = Scheduler(config, BlockManager(num_blocks, block_size, enable_prefix_caching=False))
    for i, (p, o) in enumerate(zip(prompt_lens, output_lens)):
        scheduler.add(Sequence(i, [0] * p, SamplingParams(max_tokens=o, ignore_eos=True)))
    steps = 0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        scheduler.postprocess(batch, [0] * sum(batch.samples(i) for i in range(len(batch.seqs))))
        steps += 1
    return steps


@pytest.mark.parametrize("num_blocks", [48, 96, 200, 2000])
@pytest.mark.parametrize("max_num_seqs", [4, 256])
def test_floor_is_a_lower_bound_on_the_schedulers_steps(ch10, num_blocks, max_num_seqs):
    """Every step (prefill or decode) reads the weights once, so the steps the floor counts are at most the
    steps the engine's scheduler takes with that cache; with a small cache, not far below them."""
    prompts, outs = ch10.seed_workload(24, (20, 200), (10, 300))
    lens = list(map(len, prompts))
    _, floor_steps = ch10.decode_floor_bytes(lens, outs, 1, 1, cache_tokens=num_blocks * 16, max_batch=max_num_seqs)
    real = scheduled_steps(lens, outs, num_blocks, max_num_seqs=max_num_seqs)
    assert floor_steps <= real <= 2 * floor_steps + len(lens), (floor_steps, real)
