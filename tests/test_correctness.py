"""Greedy outputs equal HF transformers' greedy outputs token for token (float32, CPU), for every tiny
architecture and every engine path that could get a token wrong: batching, prefix caching, preemption,
chunked prefill, duplicate prompts, stop tokens, max_model_len.  After each generate every KV block must be
free again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_greedy, make_tiny_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nanovllm import LLM, SamplingParams

torch.set_num_threads(1)  # tiny models: one thread is fastest, and more spin badly on a busy machine

VOCAB = 512
_REFS: dict = {}


def ref(tiny_model, prompt, n):
    """HF's greedy continuation (cached: the longest computed so far serves shorter requests)."""
    arch, _, model = tiny_model
    key = (arch, tuple(prompt))
    have = _REFS.get(key)
    if have is None or len(have) < n:
        have = _REFS[key] = hf_greedy(model, list(prompt), n)
    return have[:n]


def prompts_of(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def make_llm(tiny_model, **kw):
    _, path, _ = tiny_model
    kw.setdefault("num_kvcache_blocks", 256)
    kw.setdefault("max_model_len", 512)
    return LLM(str(path), **kw)


def generate(llm, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks, "KV blocks leaked"
    assert not llm.scheduler.has_unfinished()
    assert [o.prompt_token_ids for o in outs] == [list(p) for p in prompts]
    return outs


def check_against_hf(tiny_model, prompts, outs, max_tokens):
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    for i, (p, o, n) in enumerate(zip(prompts, outs, max_tokens)):
        assert o.token_ids == ref(tiny_model, p, n), f"prompt {i} (length {len(p)}) differs from HF"
        assert o.finish_reason == "length"


@pytest.fixture
def llm(tiny_model):
    return make_llm(tiny_model)


def test_one_prompt(tiny_model, llm):
    [p] = prompts_of([20], seed=1)
    outs = generate(llm, [p], greedy(24))
    check_against_hf(tiny_model, [p], outs, 24)


def test_greedy_continuations_are_not_degenerate(tiny_model):
    """The tiny models must make the comparison meaningful: varied tokens, different per prompt."""
    a, b = prompts_of([20, 20], seed=2)
    ra, rb = ref(tiny_model, a, 24), ref(tiny_model, b, 24)
    assert len(set(ra)) > 4 and ra != rb


def test_batch_of_mixed_lengths(tiny_model, llm):
    lengths = [1, 15, 16, 17, 100, 5, 33]
    max_tokens = [8, 12, 10, 9, 12, 16, 7]
    prompts = prompts_of(lengths, seed=3)
    outs = generate(llm, prompts, [greedy(n) for n in max_tokens])
    check_against_hf(tiny_model, prompts, outs, max_tokens)


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
def test_shared_prefix(tiny_model, caching):
    llm = make_llm(tiny_model, enable_prefix_caching=caching)
    [prefix] = prompts_of([40], seed=4)
    tails = prompts_of([3, 10, 17, 24], seed=5)
    prompts = [prefix + t for t in tails]
    first = generate(llm, prompts[:1], greedy(10))
    assert first[0].num_cached_tokens == 0
    rest = generate(llm, prompts[1:], greedy(10))
    check_against_hf(tiny_model, prompts, first + rest, 10)
    for o in rest:
        if caching:  # the prefix's two full blocks (16 tokens each) come from the first request
            assert o.num_cached_tokens >= 32 and o.num_cached_tokens % 16 == 0
            assert o.num_cached_tokens < len(o.prompt_token_ids)
        else:
            assert o.num_cached_tokens == 0
    again = generate(llm, prompts, greedy(10))  # all at once, now (with caching) mostly from the cache
    assert [o.token_ids for o in again] == [o.token_ids for o in first + rest]


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
def test_preemption(tiny_model, caching):
    # 6 requests of 20 + 30 tokens need 4 blocks each at the end; 8 blocks hold 4 prompts, not their growth
    llm = make_llm(tiny_model, num_kvcache_blocks=8, enable_prefix_caching=caching)
    prompts = prompts_of([20, 18, 22, 20, 19, 21], seed=6)
    outs = generate(llm, prompts, greedy(30))
    assert llm.scheduler.num_preemptions > 0
    check_against_hf(tiny_model, prompts, outs, 30)


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
def test_chunked_prefill(tiny_model, caching):
    llm = make_llm(tiny_model, max_num_batched_tokens=8, enable_prefix_caching=caching)
    steps = []
    run = llm.runner.run

    def spy(batch, *a, **kw):
        steps.append((sum(batch.num_new_tokens), [batch.samples(i) for i in range(len(batch.seqs))]))
        return run(batch, *a, **kw)

    llm.runner.run = spy
    prompts = prompts_of([30, 45, 60, 33], seed=7)
    outs = generate(llm, prompts, greedy(8))
    assert all(n <= 8 for n, _ in steps)
    assert sum(not s for _, samples in steps for s in samples) >= 10  # many chunks that sample nothing
    check_against_hf(tiny_model, prompts, outs, 8)


def test_chunked_prefill_with_a_cached_prefix(tiny_model):
    """A chunk that starts after prefix-cache hits (attention over cached + new tokens)."""
    llm = make_llm(tiny_model, max_num_batched_tokens=8)
    [prefix] = prompts_of([35], seed=8)
    tails = prompts_of([20, 9], seed=9)
    prompts = [prefix + t for t in tails]
    first = generate(llm, prompts[:1], greedy(6))
    second = generate(llm, prompts[1:], greedy(6))
    assert second[0].num_cached_tokens == 32
    check_against_hf(tiny_model, prompts, first + second, 6)


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
def test_same_prompts_twice_in_one_call(tiny_model, caching):
    p, q = prompts_of([37, 50], seed=10)
    llm = make_llm(tiny_model, enable_prefix_caching=caching)
    outs = generate(llm, [p, q, p, q], greedy(10))
    assert outs[0].token_ids == outs[2].token_ids and outs[1].token_ids == outs[3].token_ids
    check_against_hf(tiny_model, [p, q], outs[:2], 10)
    # copies admitted in the same step as their originals cannot hit (nothing is computed yet); with two
    # sequences at a time the copies come after the originals and find their blocks
    llm2 = make_llm(tiny_model, enable_prefix_caching=caching, max_num_seqs=2)
    outs2 = generate(llm2, [p, q, p, q], greedy(10))
    assert [o.token_ids for o in outs2] == [o.token_ids for o in outs]
    assert outs2[0].num_cached_tokens == outs2[1].num_cached_tokens == 0
    if caching:
        assert outs2[2].num_cached_tokens == 32 and outs2[3].num_cached_tokens == 48
    else:
        assert outs2[2].num_cached_tokens == outs2[3].num_cached_tokens == 0


def test_max_model_len_stops_with_length(tiny_model):
    llm = make_llm(tiny_model, max_model_len=40)
    [p] = prompts_of([30], seed=11)
    [out] = generate(llm, [p], greedy(50))
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    assert out.token_ids == ref(tiny_model, p, 10)


def test_stop_token_ids(tiny_model, llm):
    [p] = prompts_of([25], seed=12)
    full = ref(tiny_model, p, 20)
    stop = full[6]
    j = full.index(stop)  # the first time the stop token appears
    [out] = generate(llm, [p], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]))
    assert out.token_ids == full[:j + 1] and out.finish_reason == "stop"


def test_eos_from_the_model_config(tiny_model, tmp_path):
    """A model whose config names an eos token stops there, as HF's generate does."""
    arch, _, model = tiny_model
    [p] = prompts_of([18], seed=13)
    full = ref(tiny_model, p, 20)
    eos = full[8]
    hf = make_tiny_model(arch, tmp_path, eos_token_id=eos)  # same weights (same seed), eos in config.json
    expected = hf_greedy(hf, p, 20, eos_token_id=eos)
    assert expected == full[:full.index(eos) + 1]
    llm = LLM(str(tmp_path), num_kvcache_blocks=64, max_model_len=256)
    [out] = generate(llm, [p], SamplingParams(temperature=0, max_tokens=20))
    assert out.token_ids == expected and out.finish_reason == "stop"
    [out] = generate(llm, [p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert out.token_ids == full and out.finish_reason == "length"


# -- everything at once: random engine knobs and workloads, still HF's tokens -------------------------

POOL_PREFIX = prompts_of([24], seed=20)[0]
POOL = prompts_of([1, 5, 16, 17, 31], seed=21) + [POOL_PREFIX + t for t in prompts_of([1, 8, 9, 20], seed=22)]
POOL_MAX_TOKENS = 12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_configurations_match_hf(tiny_model, data):
    picks = data.draw(st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=8), label="prompts")
    max_tokens = data.draw(st.lists(st.integers(1, POOL_MAX_TOKENS), min_size=len(picks), max_size=len(picks)),
                           label="max_tokens")
    block_size = data.draw(st.sampled_from([1, 2, 4, 8, 16, 32]), label="block_size")
    prompts = [POOL[i] for i in picks]
    need = max(-(-(len(p) + n) // block_size) for p, n in zip(prompts, max_tokens))
    spare = data.draw(st.sampled_from([0, 1, 2, need, 3 * need]), label="spare_blocks")  # few: preemption
    llm = make_llm(tiny_model, kvcache_block_size=block_size, num_kvcache_blocks=need + spare,
                   max_num_batched_tokens=data.draw(st.integers(1, 64), label="max_num_batched_tokens"),
                   max_num_seqs=data.draw(st.integers(1, 8), label="max_num_seqs"),
                   enable_prefix_caching=data.draw(st.booleans(), label="caching"))
    outs = generate(llm, prompts, [greedy(n) for n in max_tokens])
    check_against_hf(tiny_model, prompts, outs, max_tokens)
    event(f"preempted: {llm.scheduler.num_preemptions > 0}")
    again = generate(llm, prompts[::-1], [greedy(n) for n in max_tokens[::-1]])  # now with a warm cache
    check_against_hf(tiny_model, prompts[::-1], again, max_tokens[::-1])


def test_step_by_step_output_equals_generate(tiny_qwen3):
    """add_request + step() + output(seq) give what generate() returns for the same request."""
    path, _ = tiny_qwen3
    llm = LLM(path, device="cpu", dtype="float32")
    prompt = prompts_of([11], seed=5)[0]
    want = llm.generate([prompt], greedy(6), use_tqdm=False)[0]
    seq = llm.add_request(prompt, greedy(6))
    assert llm.output(seq).token_ids == []  # nothing generated yet
    while llm.has_unfinished_requests():
        llm.step()
    got = llm.output(seq)
    assert (got.token_ids, got.prompt_token_ids, got.finish_reason) == (want.token_ids, want.prompt_token_ids,
                                                                         want.finish_reason)
