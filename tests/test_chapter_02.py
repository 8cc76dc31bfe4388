"""Chapter 02 (KV cache): the contiguous cache gives chapter 01's logits and tokens; the memory simulation
keeps its books straight and its paged accounting matches nanovllm's BlockManager."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import attempted, hf_greedy, make_tiny_model
from nbimport import load_chapter

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def ch02():
    return load_chapter("02_kv_cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ch02):
    path = tmp_path_factory.mktemp("tiny-llama-ch02")
    hf = make_tiny_model("llama", path)
    return path, hf, ch02.Config.from_folder(path), ch02.load_weights(path)


def test_prefill_then_decode_matches_full_forward(ch02, tiny):
    _, _, cfg, w = tiny
    ids = [7, 1, 99, 240, 3, 18]
    cache = ch02.ContiguousKVCache(cfg, max_len=16)
    parts = [ch02.forward_cached(w, cfg, ids[:4], cache), ch02.forward_cached(w, cfg, ids[4:5], cache),
             ch02.forward_cached(w, cfg, ids[5:], cache)]
    assert cache.length == len(ids)
    torch.testing.assert_close(torch.cat(parts), ch02.forward(w, cfg, ids), **TOL)


def test_chunked_prefill_matches_too(ch02, tiny):
    _, _, cfg, w = tiny
    ids = list(range(10, 30))
    cache = ch02.ContiguousKVCache(cfg, max_len=20)
    parts = [ch02.forward_cached(w, cfg, ids[i:i + 7], cache) for i in range(0, 20, 7)]
    torch.testing.assert_close(torch.cat(parts), ch02.forward(w, cfg, ids), **TOL)


def test_generate_with_cache_matches_no_cache_hf_and_nanovllm(ch02, tiny):
    from nanovllm import LLM, SamplingParams

    path, hf, cfg, w = tiny
    prompt = [5, 6, 7, 300, 12]
    ours = ch02.generate_with_cache(w, cfg, prompt, 12)
    assert ours == ch02.generate_no_cache(w, cfg, prompt, 12) == hf_greedy(hf, prompt, 12)
    llm = LLM(str(path), num_kvcache_blocks=16, dtype="float32", device="cpu")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert out[0].token_ids == ours


def test_cache_size_and_overflow(ch02, tiny):
    _, _, cfg, w = tiny
    cache = ch02.ContiguousKVCache(cfg, max_len=4)
    per_token = ch02.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4)
    assert cache.nbytes == 4 * per_token
    ch02.forward_cached(w, cfg, [1, 2, 3], cache)
    with pytest.raises(ValueError, match="cache full"):
        ch02.forward_cached(w, cfg, [4, 5], cache)


def _workload(seed, n=40):
    rng = random.Random(seed)
    return [rng.randint(1, 200) for _ in range(n)], [rng.randint(1, 150) for _ in range(n)]


@pytest.mark.parametrize("policy", ["max_len", "exact", "paged"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulation_books_balance(ch02, policy, seed):
    prompts, outputs = _workload(seed)
    capacity, max_len, bs = 2048, 400, 16
    steps = ch02.simulate(prompts, outputs, capacity, policy, block_size=bs, max_len=max_len)
    for s in steps:
        assert 0 <= s["used"] <= s["held"] <= capacity
        if policy == "max_len":
            assert s["running"] <= capacity // max_len
        if policy == "paged":
            assert s["held"] - s["used"] < bs * max(s["running"], 1)
    # every output token is generated exactly once: each step generates one per running request (the last
    # record of a step counts the requests that just generated)
    assert sum(s["running"] for s in steps) >= sum(outputs)
    if policy != "paged":  # no preemption: exactly one token per running request per step
        assert sum(s["running"] for s in steps) == sum(outputs)


def test_simulation_with_unlimited_memory_takes_the_longest_output(ch02):
    prompts, outputs = _workload(3)
    for policy in ("max_len", "exact", "paged"):
        assert len(ch02.simulate(prompts, outputs, 10**7, policy, max_len=400)) == max(outputs)


def test_simulation_paged_blocks_match_block_manager(ch02):
    from nanovllm.engine.block_manager import BlockManager
    from nanovllm.engine.sequence import Sequence

    for prompt, output, bs in [(1, 40, 16), (16, 17, 16), (37, 60, 8), (100, 3, 4)]:
        steps = ch02.simulate([prompt], [output], 10**6, "paged", block_size=bs)
        bm = BlockManager(1000, bs, enable_prefix_caching=False)
        seq = Sequence(0, [1] * prompt)
        bm.allocate(seq)
        for s in steps:  # each step the simulated request gains a token: so does the package's sequence
            seq.token_ids.append(0)
            bm.append_slot(seq)
            assert s["held"] == len(seq.block_table) * bs == math.ceil(len(seq) / bs) * bs


def test_simulation_paged_preempts_under_pressure(ch02):
    prompts, outputs = [60] * 6, [100] * 6
    steps = ch02.simulate(prompts, outputs, capacity=640, policy="paged")
    assert max(s["held"] for s in steps) <= 640
    assert len(steps) > max(outputs)  # it had to take turns


# -- the lab: exercise 4, a cache that grows, in the chapter's forward_cached --------------------------------
def check_growing_cache(cls, ch, cfg, w):
    """The chapter's check: the logits of a prefill and decode steps, the capacity doubling gives, and the
    greedy tokens of generate_with_cache."""
    cache = cls(cfg, initial=4)
    assert cache.length == 0 and cache.capacity == 4
    ids = [7, 1, 99, 240, 3, 18, 5, 77, 300]
    parts = [ch.forward_cached(w, cfg, ids[:5], cache)] + [ch.forward_cached(w, cfg, [t], cache) for t in ids[5:]]
    assert cache.length == len(ids) and cache.capacity == 16
    torch.testing.assert_close(torch.cat(parts), ch.forward(w, cfg, ids), **TOL)
    per_token = ch.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4)
    assert cache.nbytes == 16 * per_token
    long = cls(cfg, initial=2)
    ch.forward_cached(w, cfg, list(range(11)), long)  # one append that needs three doublings
    assert long.capacity == 16 and long.length == 11
    prompt = [5, 6, 7, 300, 12]
    assert ch.generate_with_cache(w, cfg, prompt, 12, cache=cls(cfg)) == ch.generate_no_cache(w, cfg, prompt, 12)


def test_growing_cache_gives_the_same_logits(lab_code, tiny):
    _, _, cfg, w = tiny
    ch = load_chapter("02_kv_cache", code=lab_code)
    with attempted(lab_code):
        check_growing_cache(ch.GrowingKVCache, ch, cfg, w)


def test_a_wrong_growing_cache_fails_the_check(tiny):
    _, _, cfg, w = tiny
    ch = load_chapter("02_kv_cache", code="solutions")

    class ForgetsToCopy(ch.GrowingKVCache):  # grows, but the new tensors start empty
        def append(self, layer, k, v):
            if self.length + k.shape[0] > self.capacity:
                old = self.capacity
                self.k, self.v = self.k.new_zeros(self.k.shape[0], 2 * old, *self.k.shape[2:]), self.v.new_zeros(
                    self.v.shape[0], 2 * old, *self.v.shape[2:])
            return super().append(layer, k, v)

    class GrowsByOne(ch.GrowingKVCache):  # right values, but a copy of the whole cache at every step
        def append(self, layer, k, v):
            end = self.length + k.shape[0]
            if end > self.capacity:
                for name in ("k", "v"):
                    old = getattr(self, name)
                    new = old.new_zeros(old.shape[0], end, *old.shape[2:])
                    new[:, :self.length] = old[:, :self.length]
                    setattr(self, name, new)
            return super().append(layer, k, v)

    for wrong in (ForgetsToCopy, GrowsByOne):
        with pytest.raises(AssertionError):
            check_growing_cache(wrong, ch, cfg, w)
