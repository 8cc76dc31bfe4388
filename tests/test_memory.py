"""Engine memory: the KV cache is no larger than the configuration can use, and an engine's memory goes back
the moment it is dropped (``del llm``), shut down (``llm.shutdown()``) or left (``with LLM(...)``), with no
``gc.collect()``: nothing in it sits in a reference cycle.  The GPU side of both is checked by
``tests/gpu/engine_check.py`` ("memory release", "KV cache sized by the configuration")."""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine.model_runner import (
    CPU_KV_CACHE_CAP,
    cpu_kv_budget,
    gpu_kv_budget,
    kv_blocks_usable,
    kv_cache_blocks,
)

GiB = 1 << 30


@pytest.fixture
def no_gc():
    """The cycle collector off: whatever is freed below is freed by reference counting alone."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# -- KV cache sizing ---------------------------------------------------------------------------------
def test_the_cache_is_capped_by_what_the_configuration_can_use():
    config = EngineConfig(max_num_seqs=4, max_model_len=512)
    assert kv_blocks_usable(config, 16) == 4 * 32
    assert kv_blocks_usable(EngineConfig(max_num_seqs=3, max_model_len=100), 16) == 3 * 7  # partial last block
    per_block = 1 << 20
    assert kv_cache_blocks(100 * GiB, per_block, config, 16) == 128  # a big card: what the config can use
    assert kv_cache_blocks(50 * per_block + 7, per_block, config, 16) == 50  # a small one: what memory allows
    assert kv_cache_blocks(-GiB, per_block, config, 16) == 0  # nothing left (the runner then refuses)
    # one sequence at least: max_num_seqs=1 still holds a whole max_model_len sequence
    assert kv_cache_blocks(100 * GiB, per_block, EngineConfig(max_num_seqs=1, max_model_len=4096), 16) == 256


def test_memory_budgets():
    assert cpu_kv_budget(64 * GiB) == CPU_KV_CACHE_CAP
    assert cpu_kv_budget(2 * GiB) == GiB // 2
    # an 80 GiB card, 10 GiB taken by another process, our allocator holding 5 GiB and peaking at 4 GiB
    total, reserved = 80 * GiB, 5 * GiB
    free = total - 10 * GiB - reserved
    assert gpu_kv_budget(total, free, reserved, 4 * GiB, 0.9) == int(0.9 * total) - 10 * GiB - 4 * GiB
    assert gpu_kv_budget(total, free, reserved, 4 * GiB, 0.1) < 0  # the share is used up already


def test_an_engine_takes_the_blocks_its_configuration_can_use(tiny_qwen3):
    llm = LLM(tiny_qwen3[0], device="cpu", max_num_seqs=4, max_model_len=512)
    assert llm.runner.num_kvcache_blocks == llm.block_manager.num_blocks == 4 * 512 // 16
    assert llm.runner.kv_cache.shape[2] == 4 * 512 // 16
    explicit = LLM(tiny_qwen3[0], device="cpu", max_num_seqs=4, max_model_len=512, num_kvcache_blocks=500)
    assert explicit.block_manager.num_blocks == 500  # asked for explicitly: taken as given


# -- release: weights die with the engine ------------------------------------------------------------
def engine_refs(llm) -> list[weakref.ref]:
    """Weak references to everything of the engine that holds memory: every weight, the KV cache, the model."""
    runner = llm.runner
    return [weakref.ref(x) for x in (*runner.model.parameters(), runner.kv_cache, runner.model, runner)]


def used_engine(path, **kw) -> tuple[LLM, list]:
    """An engine after the kinds of use that could leave references behind: generate() with a progress bar
    and seeded sampling, and a request added and stepped but unfinished (its Sequence kept by the caller)."""
    llm = LLM(path, device="cpu", max_num_seqs=4, max_model_len=128, **kw)
    llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, seed=7), use_tqdm=True)
    pending = llm.add_request([6, 7, 8], SamplingParams(temperature=0, max_tokens=20))
    llm.step()
    return llm, [pending]


def test_del_frees_the_weights_without_the_cycle_collector(tiny_model, no_gc):
    arch, path, _ = tiny_model
    llm, kept = used_engine(path)
    refs = engine_refs(llm)
    del llm
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{arch}: {len(alive)} of {len(refs)} objects outlive `del llm` (a reference cycle?)"
    assert kept  # the caller's Sequence holds nothing of the engine


def test_shutdown_frees_the_weights_while_the_engine_object_lives(tiny_qwen3, no_gc):
    llm, _ = used_engine(tiny_qwen3[0])
    refs = engine_refs(llm)[:-1]  # not the runner: the LLM still holds it (an empty shell)
    llm.shutdown()
    assert all(r() is None for r in refs)
    llm.shutdown()  # idempotent
    assert not llm.has_unfinished_requests()  # the pending request was dropped
    for call in (lambda: llm.generate([[1, 2]], use_tqdm=False), lambda: llm.add_request([1]), llm.step,
                 llm.abort_all, llm.reset_prefix_cache):  # (chat() ends in generate())
        with pytest.raises(RuntimeError, match="^this engine has been shut down$"):
            call()
    assert "kv_blocks" in repr(llm)  # still printable


def test_leaving_with_frees_the_weights(tiny_qwen3, no_gc):
    with LLM(tiny_qwen3[0], device="cpu", max_num_seqs=4, max_model_len=128) as llm:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)
        refs = engine_refs(llm)[:-1]
    assert all(r() is None for r in refs)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2]], use_tqdm=False)


def test_startup_time_is_recorded(tiny_qwen3):
    llm = LLM(tiny_qwen3[0], device="cpu", max_num_seqs=2, max_model_len=64)
    assert 0 < llm.startup_seconds < 600
    assert "startup" not in repr(llm)  # repr stays the same from run to run (notebooks compare it)


# -- release: the process's resident memory goes back ------------------------------------------------
def rss() -> int:
    """This process's resident set size in bytes (Linux), after asking glibc to give its free heap pages back
    (``malloc_trim``): large tensors are usually mmap'ed and their pages return at once, but after a long test
    session the allocator may serve them from heap it kept, and then only a trim shows what was freed."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


BIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=65536, hidden_size=256,
           intermediate_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_resident_memory_returns_after_del(tmp_path, no_gc):
    """A model whose weights dominate (two 64 MiB vocabulary tables, random weights, no checkpoint) and a tiny
    KV cache: building it must raise the RSS by about the weights, and ``del`` (cycle collector off) must bring
    it back.  Tolerance: the allocator may keep a few MiB of small freed chunks, and the engine leaves some
    Python objects behind it (imports, caches); large tensors are mmap'ed, so their pages go back at once."""
    (tmp_path / "config.json").write_text(json.dumps(BIG))
    kw = dict(device="cpu", dtype="float32", load_format="dummy", max_num_seqs=1, max_model_len=64)
    LLM(tmp_path, **kw)  # a first engine: whatever is imported and cached once per process stays after it
    base = rss()
    llm = LLM(tmp_path, **kw)
    weights = sum(p.numel() * p.element_size() for p in llm.runner.model.parameters())
    assert weights > 128 << 20
    built = rss()
    assert built - base > 0.9 * weights, f"the weights are not resident? +{(built - base) >> 20} MiB"
    del llm
    after = rss()
    assert after - base < 0.1 * weights, (f"after del the RSS is still {(after - base) >> 20} MiB above the "
                                          f"baseline ({weights >> 20} MiB of weights)")
