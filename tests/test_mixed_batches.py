"""Mixed batches (``mixed_batches=True``, Sarathi-Serve): while a long prompt is prefilled in chunks, the
running requests keep getting a token every step, and every request's tokens stay HF's."""

from __future__ import annotations

import pytest
from conftest import hf_greedy
from test_overlap import overlapped

from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def engine(path, **kw) -> LLM:
    return LLM(path, device="cpu", dtype="float32", kvcache_block_size=4, max_num_batched_tokens=16, **kw)


@pytest.mark.parametrize("mixed", [True, False])
def test_a_long_prompt_stalls_the_decodes_only_without_mixed_batches(tiny_qwen3, mixed):
    path, _ = tiny_qwen3
    llm = engine(path, mixed_batches=mixed)
    early = [llm.add_request(list(range(5 + i, 10 + i)), GREEDY) for i in range(2)]
    llm.step()  # both prompts in one prefill step: each has its first token
    assert [s.num_completion_tokens for s in early] == [1, 1]
    late = llm.add_request(list(range(100, 140)), GREEDY)  # 40 tokens: three chunks of a 16-token budget
    steps = []
    while late.num_computed_tokens < 40:
        batch, _ = llm.step()
        steps.append((batch.is_prefill, sum(batch.num_new_tokens), [s.num_completion_tokens for s in early]))
        assert sum(batch.num_new_tokens) <= 16
    if mixed:  # every step: both decodes (1 token each) and a 14-token chunk of the long prompt
        assert [s[1] for s in steps] == [16, 16, 14]
        assert [s[2] for s in steps] == [[2, 2], [3, 3], [4, 4]]
    else:  # three prefill steps in which the early requests get nothing
        assert [s[1] for s in steps] == [16, 16, 8]
        assert all(s[2] == [1, 1] for s in steps)
    llm.abort_all()


@pytest.mark.parametrize("overlap", [False, True])
def test_staggered_requests_give_hf_tokens(tiny_qwen3, overlap):
    """Requests arrive while others decode; some need preemption (a tight cache): tokens equal HF's."""
    path, hf = tiny_qwen3
    llm = engine(path, mixed_batches=True, num_kvcache_blocks=24)
    if overlap:
        llm = overlapped(llm)
    prompts = [list(range(3 + 7 * i, 3 + 7 * i + n)) for i, n in enumerate((6, 23, 3, 31, 9))]
    seqs, arrivals = [], {0: [0], 2: [1, 2], 5: [3], 6: [4]}
    step = 0
    while len(seqs) < len(prompts) or llm.has_unfinished_requests():
        for i in arrivals.get(step, []):
            seqs.append(llm.add_request(prompts[i], GREEDY))
        if llm.has_unfinished_requests():
            (llm.overlapped.step if overlap else llm.step)()
        step += 1
    if overlap:
        llm.overlapped.collect()
    for p, s in zip(prompts, seqs):
        assert s.completion_token_ids == hf_greedy(hf, p, 12)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert llm.scheduler.num_preemptions > 0, "the tight cache was meant to preempt"


def test_generate_with_mixed_batches_equals_without(tiny_qwen3):
    path, _ = tiny_qwen3
    prompts = [list(range(2, 2 + n)) for n in (40, 3, 17, 5, 29)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=8 + i) for i in range(5)]
    want = [o.token_ids for o in engine(path).generate(prompts, params, use_tqdm=False)]
    got = [o.token_ids for o in engine(path, mixed_batches=True).generate(prompts, params, use_tqdm=False)]
    assert got == want
