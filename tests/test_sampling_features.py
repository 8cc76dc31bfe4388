"""The serving features of SamplingParams, each checked on CPU against HF transformers or a from-scratch
reference: stop strings, min_tokens, the penalties, min_p, logprobs, n > 1 (prompt blocks shared), and a
clear error for every bad value."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import hf_greedy, make_tiny_model
from test_overlap import overlapped

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler, apply_min_p, apply_penalties, process_logits, token_counts
from nanovllm.loading import embedded

torch.set_num_threads(1)  # tiny models: one thread is fastest, and more spin badly on a busy machine

PROMPT = list(range(40, 60))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny qwen3 with the embedded model's tokenizer (its first 512 tokens are the tiny vocabulary)."""
    path = tmp_path_factory.mktemp("tiny-qwen3-tok")
    hf = make_tiny_model("qwen3", path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded.embedded_model_dir() / name, path)
    return path, hf


@pytest.fixture(params=["plain", "overlapped"])
def llm(request, tiny):
    engine = LLM(tiny[0], device="cpu", num_kvcache_blocks=64, max_model_len=200, kvcache_block_size=8)
    return overlapped(engine) if request.param == "overlapped" else engine


def generate(llm, prompt, **kwargs):
    [out] = llm.generate([prompt], SamplingParams(**kwargs), use_tqdm=False)
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.scheduler.has_unfinished()
    return out


def hf_logprobs(hf, ids) -> torch.Tensor:
    """log_softmax of HF's float32 logits at every position of ``ids``."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


# -- SamplingParams ----------------------------------------------------------------------------------


def test_new_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.stop,
            p.include_stop_str_in_output, p.min_tokens, p.logprobs, p.prompt_logprobs) == \
        (1, 0.0, 0.0, 1.0, 0.0, [], False, 0, None, None)
    assert p.plain and not p.penalized
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(stop=("a", "b")).stop == ["a", "b"]


@pytest.mark.parametrize("kwargs", [
    dict(n=4), dict(presence_penalty=-2), dict(frequency_penalty=2), dict(repetition_penalty=0.5),
    dict(min_p=0), dict(min_p=1), dict(min_tokens=16), dict(logprobs=0), dict(logprobs=20), dict(prompt_logprobs=3),
    dict(stop=["a", "bc"]), dict(include_stop_str_in_output=True),
])
def test_valid(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(n=0), ValueError, ["n must", "0"]),
    (dict(n=-2), ValueError, ["n must", "-2"]),
    (dict(n=1.5), TypeError, ["n must", "float"]),
    (dict(presence_penalty=2.5), ValueError, ["presence_penalty", "2.5"]),
    (dict(frequency_penalty=-3), ValueError, ["frequency_penalty", "-3"]),
    (dict(frequency_penalty=math.nan), ValueError, ["frequency_penalty", "nan"]),
    (dict(presence_penalty="1"), TypeError, ["presence_penalty", "str"]),
    (dict(repetition_penalty=0), ValueError, ["repetition_penalty", "0"]),
    (dict(repetition_penalty=-1.2), ValueError, ["repetition_penalty", "-1.2"]),
    (dict(repetition_penalty=math.inf), ValueError, ["repetition_penalty", "inf"]),
    (dict(min_p=-0.1), ValueError, ["min_p", "-0.1"]),
    (dict(min_p=1.5), ValueError, ["min_p", "1.5"]),
    (dict(min_tokens=-1), ValueError, ["min_tokens", "-1"]),
    (dict(min_tokens=20, max_tokens=16), ValueError, ["min_tokens", "20", "max_tokens", "16"]),
    (dict(logprobs=-1), ValueError, ["logprobs", "-1"]),
    (dict(logprobs=21), ValueError, ["logprobs", "21"]),
    (dict(prompt_logprobs=99), ValueError, ["prompt_logprobs", "99"]),
    (dict(logprobs=2.0), TypeError, ["logprobs", "float"]),
    (dict(stop=5), TypeError, ["stop", "int"]),
    (dict(stop=["a", 3]), TypeError, ["stop", "int", "index 1"]),
    (dict(stop=""), ValueError, ["stop", "empty"]),
    (dict(stop=["a", ""]), ValueError, ["stop", "empty", "index 1"]),
    (dict(include_stop_str_in_output=1), TypeError, ["include_stop_str_in_output", "int"]),
])
def test_bad_values_name_the_field(kwargs, exc, words):
    with pytest.raises(exc) as info:
        SamplingParams(**kwargs)
    for w in words:
        assert w in str(info.value), f"{info.value} does not mention {w!r}"


def test_stop_strings_need_a_tokenizer(tiny_qwen3):
    llm = LLM(tiny_qwen3[0], device="cpu", num_kvcache_blocks=16)
    with pytest.raises(ValueError, match="stop strings.*no tokenizer"):
        llm.generate([[1, 2, 3]], SamplingParams(stop="x"), use_tqdm=False)
    assert not llm.scheduler.has_unfinished()


# -- logits processing against HF's processors and from-scratch references ---------------------------------


def test_repetition_penalty_equals_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 3
    prompt, completion = torch.randint(0, 40, (3, 6), generator=g), torch.randint(0, 40, (3, 5), generator=g)
    zero = torch.zeros(3)
    ours = apply_penalties(logits, token_counts(prompt.tolist(), 40, logits.device) > 0,
                           token_counts(completion.tolist(), 40, logits.device), zero, zero, torch.full((3,), 1.7))
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.cat([prompt, completion], 1), logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_from_scratch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 30, generator=g)
    completions = [[3, 3, 3, 7, 9], [0, 29, 29]]
    presence, frequency = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0])
    want = logits.clone()
    for row, toks in enumerate(completions):
        for t in set(toks):
            want[row, t] -= presence[row] + frequency[row] * toks.count(t)
    no_prompt = torch.zeros(2, 30, dtype=torch.bool)
    ours = apply_penalties(logits, no_prompt, token_counts(completions, 30, logits.device), presence, frequency,
                           torch.ones(2))
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_equals_hf(min_p):
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 2
    ours = apply_min_p(logits, torch.full((4,), min_p))
    theirs = MinPLogitsWarper(min_p)(None, logits.clone()) if min_p > 0 else logits
    assert torch.equal(ours.isinf(), theirs.isinf())
    torch.testing.assert_close(ours[~ours.isinf()], theirs[~theirs.isinf()])


def test_min_tokens_masks_stop_tokens_only_while_the_completion_is_short():
    logits = torch.zeros(2, 10)
    short = Sequence(0, [1, 2, 3, 4], SamplingParams(min_tokens=2))
    short.token_ids.append(5)  # one completion token: still short
    done = Sequence(1, [1, 2, 3], SamplingParams(min_tokens=2))
    done.token_ids += [5, 6]  # two: no longer masked
    short.stop_ids = done.stop_ids = (7, 9)
    out = process_logits(logits, [short, done])
    assert out[0].isinf().nonzero().flatten().tolist() == [7, 9] and not out[1].isinf().any()
    assert not logits.isinf().any(), "the logits passed in are not changed"


def test_logprobs_are_the_raw_distributions_whatever_the_processing():
    """logprobs of the raw logits (vLLM's default), the sampled token first with its rank, then the top k."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 64, generator=g) * 3
    params = [SamplingParams(temperature=0, logprobs=4), SamplingParams(temperature=0.7, seed=5, logprobs=0,
                                                                       repetition_penalty=1.5),
              SamplingParams(temperature=1.0, top_k=5)]
    seqs = [Sequence(i, [1, 2, 3], p) for i, p in enumerate(params)]
    tokens = Sampler(torch.device("cpu"), seed=0)(logits, seqs).tolist()
    raw = logits.log_softmax(-1)
    ids, lps, rank = seqs[0].logprobs[0]
    top = raw[0].topk(4)
    assert ids == [tokens[0]] + top.indices.tolist() and rank == 1 and tokens[0] == int(logits[0].argmax())
    torch.testing.assert_close(torch.tensor(lps), torch.cat([top.values[:1], top.values]))
    [(ids, lps, rank)] = seqs[1].logprobs
    assert ids == [tokens[1]] and lps[0] == pytest.approx(float(raw[1, tokens[1]]), abs=1e-6)
    assert rank == int((raw[1] > raw[1, tokens[1]]).sum()) + 1
    assert seqs[2].logprobs is None


# -- end to end on a tiny model ------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_greedy_repetition_penalty_equals_hf_generate(llm, tiny, penalty):
    prompt = [5, 6, 5, 6, 5, 6, 7, 8, 9] * 2
    out = generate(llm, prompt, temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=penalty)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = tiny[1].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert out.token_ids == want.tolist()
    assert out.token_ids != hf_greedy(tiny[1], prompt, 24), "the penalty changes nothing here: a weak test"


def test_greedy_presence_and_frequency_penalties_equal_a_reference_loop(llm, tiny):
    hf, ids = tiny[1], list(PROMPT)
    for _ in range(16):  # from scratch: greedy over the penalized logits of the full sequence
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        completion = ids[len(PROMPT):]
        for t in set(completion):
            logits[t] -= 0.8 + 0.6 * completion.count(t)
        ids.append(int(logits.argmax()))
    out = generate(llm, PROMPT, temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=0.8,
                   frequency_penalty=0.6)
    assert out.token_ids == ids[len(PROMPT):]


def test_min_tokens_equals_hf_min_new_tokens(llm, tiny):
    ref = hf_greedy(tiny[1], PROMPT, 30)
    stop = ref[1]
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        want = tiny[1].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                                min_new_tokens=6, eos_token_id=stop, pad_token_id=stop)[0, len(PROMPT):].tolist()
    want = want[:want.index(stop) + 1] if stop in want[6:] else want
    out = generate(llm, PROMPT, temperature=0, max_tokens=30, stop_token_ids=[stop], min_tokens=6)
    assert out.token_ids == want and stop not in out.token_ids[:6]
    assert out.finish_reason == ("stop" if out.token_ids[-1] == stop else "length")
    early = generate(llm, PROMPT, temperature=0, max_tokens=30, stop_token_ids=[stop])
    assert early.token_ids == ref[:2] and early.stop_reason == stop


def test_min_p_one_is_greedy(llm, tiny):
    out = generate(llm, PROMPT, temperature=1.0, min_p=1.0, max_tokens=12, ignore_eos=True)
    assert out.token_ids == hf_greedy(tiny[1], PROMPT, 12)


def test_seeded_min_p_sampling_is_reproducible_and_keeps_to_the_min_p_set(llm, tiny):
    params = dict(temperature=1.0, min_p=0.2, max_tokens=10, ignore_eos=True, seed=7, logprobs=0)
    out = generate(llm, PROMPT, **params)
    assert generate(llm, PROMPT, **params).token_ids == out.token_ids
    raw = hf_logprobs(tiny[1], PROMPT + out.token_ids)[len(PROMPT) - 1:-1]
    for t, row in zip(out.token_ids, raw):
        assert row[t] >= math.log(0.2) + row.max() - 1e-4  # p(t) >= min_p * p(best)


def test_logprobs_equal_hf_log_softmax(llm, tiny):
    out = generate(llm, PROMPT, temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    raw = hf_logprobs(tiny[1], PROMPT + out.token_ids)[len(PROMPT) - 1:-1]
    c = out.outputs[0]
    assert len(c.logprobs) == 8
    for t, d, row in zip(out.token_ids, c.logprobs, raw):
        top = row.topk(5)
        assert list(d) == top.indices.tolist()  # greedy: the sampled token is the best, first in both
        assert [d[i].rank for i in d] == [1, 2, 3, 4, 5]
        torch.testing.assert_close(torch.tensor([d[i].logprob for i in d]), top.values, atol=1e-4, rtol=0)
        assert d[t].decoded_token == llm.tokenizer.convert_tokens_to_string([llm.tokenizer.convert_ids_to_tokens(t)])
    assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(out.token_ids, c.logprobs)))
    assert generate(llm, PROMPT, temperature=0, max_tokens=3).outputs[0].logprobs is None


def test_sampled_token_logprob_and_rank(llm, tiny):
    out = generate(llm, PROMPT, temperature=1.5, seed=3, max_tokens=10, ignore_eos=True, logprobs=2)
    raw = hf_logprobs(tiny[1], PROMPT + out.token_ids)[len(PROMPT) - 1:-1]
    assert any(next(iter(d.values())).rank > 1 for d in out.outputs[0].logprobs), "sampled only the best tokens"
    for t, d, row in zip(out.token_ids, out.outputs[0].logprobs, raw):
        assert next(iter(d)) == t and len(d) in (2, 3)
        assert d[t].logprob == pytest.approx(float(row[t]), abs=1e-4)
        assert d[t].rank == int((row > row[t] + 1e-5).sum()) + 1


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_ends_the_request_and_cuts_the_text(llm, include):
    ref = generate(llm, PROMPT, temperature=0, max_tokens=40, ignore_eos=True)
    text = ref.text
    stop = next(text[i:i + 3] for i in range(8, len(text)) if text[i:i + 3].isascii() and text[i:i + 3].strip())
    cut = text.index(stop)
    out = generate(llm, PROMPT, temperature=0, max_tokens=40, ignore_eos=True, stop=["NEVER", stop],
                   include_stop_str_in_output=include)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (text[:cut + len(stop)] if include else text[:cut])
    n = len(out.token_ids)  # the token that completes the stop string is the last one
    assert out.token_ids == ref.token_ids[:n]
    assert stop in llm.tokenizer.decode(out.token_ids) and stop not in llm.tokenizer.decode(out.token_ids[:-1])


def test_min_tokens_holds_off_stop_strings(llm):
    ref = generate(llm, PROMPT, temperature=0, max_tokens=40, ignore_eos=True)
    stop = ref.text[:4].strip() or ref.text[:4]  # found within the first tokens
    early = generate(llm, PROMPT, temperature=0, max_tokens=40, ignore_eos=True, stop=stop)
    assert early.finish_reason == "stop" and len(early.token_ids) < 10
    late = generate(llm, PROMPT, temperature=0, max_tokens=40, ignore_eos=True, stop=stop, min_tokens=10)
    assert len(late.token_ids) >= 10 and late.token_ids == ref.token_ids[:len(late.token_ids)]


def test_n_greedy_gives_n_copies_of_the_single_completion(llm):
    one = generate(llm, PROMPT, temperature=0, max_tokens=10, ignore_eos=True)
    out = generate(llm, PROMPT, temperature=0, max_tokens=10, ignore_eos=True, n=4)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(c.token_ids == one.token_ids and c.text == one.text for c in out.outputs)
    assert out.token_ids == one.token_ids and out.finish_reason == "length"


def test_n_seeded_is_distinct_and_reproducible(llm):
    params = dict(temperature=1.0, max_tokens=10, ignore_eos=True, seed=11, n=4)
    out = generate(llm, PROMPT, **params)
    runs = [c.token_ids for c in out.outputs]
    assert len({tuple(r) for r in runs}) == 4
    assert [c.token_ids for c in generate(llm, PROMPT, **params).outputs] == runs
    assert generate(llm, PROMPT, **{**params, "n": 1}).token_ids == runs[0]
    assert generate(llm, PROMPT, **{**params, "n": 1, "seed": 12}).token_ids == runs[1]


def test_n_shares_the_prompt_blocks(tiny):
    """The prompt's full blocks are computed once and held by all n completions; each has its own last
    (partial) prompt block and completion blocks; everything is free after."""
    llm = LLM(tiny[0], device="cpu", num_kvcache_blocks=64, max_model_len=200, kvcache_block_size=8)
    bm = llm.block_manager
    seq = llm.add_request(PROMPT, SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True, n=3))
    prefilled = 0
    while llm.has_unfinished_requests():
        batch, _ = llm.step()
        if batch.is_prefill:
            prefilled += sum(batch.num_new_tokens)
        family = [seq] + seq.children
        if all(s.block_table for s in family):
            full = seq.block_table[:len(PROMPT) // 8]
            assert all(s.block_table[:2] == full for s in family)
            assert [bm.blocks[b].ref_count for b in full] == [3, 3]
            assert bm.num_blocks - bm.num_free_blocks == 2 + sum(len(s.block_table) - 2 for s in family)
    assert prefilled == len(PROMPT) + 2 * (len(PROMPT) - 16)  # the children compute only the last 4 tokens
    out = llm.output(seq)
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 6 for c in out.outputs) and out.finished
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_ends_every_completion(tiny):
    llm = LLM(tiny[0], device="cpu", num_kvcache_blocks=64, max_model_len=200)
    seq = llm.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=3))
    llm.step()
    assert llm.scheduler.abort(seq)
    assert all(s.finish_reason == "abort" for s in [seq] + seq.children)
    assert not llm.has_unfinished_requests() and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("chunk", [None, 8])
def test_prompt_logprobs_equal_hf_log_softmax(tiny, chunk):
    """Every prompt token after the first, with its rank and the top 3, from the logits of the token before;
    the same when the prompt is cut into chunks, and when its blocks are in the prefix cache already."""
    kwargs = {} if chunk is None else dict(max_num_batched_tokens=chunk)
    llm = overlapped(LLM(tiny[0], device="cpu", num_kvcache_blocks=64, max_model_len=200, kvcache_block_size=8,
                         **kwargs))
    raw = hf_logprobs(tiny[1], PROMPT)
    generate(llm, PROMPT, temperature=0, max_tokens=2)  # the prompt's blocks are now cached
    out = generate(llm, PROMPT, temperature=0, max_tokens=2, prompt_logprobs=3, n=2)
    assert out.num_cached_tokens == 0, "a prompt_logprobs request computes its whole prompt"
    assert len(out.prompt_logprobs) == len(PROMPT) and out.prompt_logprobs[0] is None
    for t, d, row in zip(PROMPT[1:], out.prompt_logprobs[1:], raw):
        assert next(iter(d)) == t and d[t].rank == int((row > row[t] + 1e-5).sum()) + 1
        assert d[t].logprob == pytest.approx(float(row[t]), abs=1e-4)
        top = row.topk(3)
        assert [d[i].rank for i in top.indices.tolist()] == [1, 2, 3]
        torch.testing.assert_close(torch.tensor([d[i].logprob for i in top.indices.tolist()]), top.values,
                                   atol=1e-4, rtol=0)
    assert generate(llm, PROMPT, temperature=0, max_tokens=2).prompt_logprobs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the real overlapped loop and CUDA graphs")
def test_the_gpu_engine_gives_what_the_cpu_one_gives(tiny):
    """On a GPU the features take the real overlapped loop (decode steps launched ahead, prefill graphs, the
    sampler's parameters in pinned buffers); in float32 the greedy results equal the CPU engine's."""
    features = [dict(), dict(repetition_penalty=1.3), dict(presence_penalty=0.5, frequency_penalty=0.5),
                dict(min_p=0.5), dict(logprobs=3), dict(prompt_logprobs=2), dict(n=3), dict(min_tokens=5),
                dict(stop=[" the", "a"]), dict(stop_token_ids=[hf_greedy(tiny[1], PROMPT, 3)[2]])]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **kw) for kw in features]
    prompts = [PROMPT[:10 + i] for i in range(len(params))]
    engines = [LLM(tiny[0], device=d, dtype="float32", num_kvcache_blocks=64, max_model_len=200)
               for d in ("cpu", "cuda")]
    assert engines[1].overlapped is not None
    cpu, gpu = (e.generate(prompts, params, use_tqdm=False) for e in engines)
    for c, g in zip(cpu, gpu):
        assert [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in c.outputs] == \
            [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in g.outputs]
        for lc, lg in zip(c.outputs[0].logprobs or [], g.outputs[0].logprobs or []):
            assert list(lc) == list(lg) and all(abs(lc[t].logprob - lg[t].logprob) < 1e-3 for t in lc)
        for lc, lg in zip((c.prompt_logprobs or [])[1:], (g.prompt_logprobs or [])[1:]):
            assert list(lc)[0] == list(lg)[0] and all(abs(lc[t].logprob - lg[t].logprob) < 1e-3 for t in lc)
    assert engines[1].block_manager.num_free_blocks == engines[1].block_manager.num_blocks
