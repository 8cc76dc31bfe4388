"""Chapters 06 (sampling), 07 (CUDA graphs, torch.compile, overlapped decode) and 08 (Triton kernels): the
from-scratch pieces, imported from the notebooks' ``export`` cells, must agree with the package; and the
committed notebooks must stay clean.  Without a GPU the chapter's Triton kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set below before any kernel is defined), on tiny shapes."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import interpreted_triton_kernels  # noqa: E402
from nbimport import CHAPTERS, load_chapter  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.attention import torch_ref  # noqa: E402
from nanovllm.engine.cuda_graphs import fill_decode_inputs  # noqa: E402
from nanovllm.engine.overlap import OverlapScheduler  # noqa: E402
from nanovllm.layers import sampler  # noqa: E402
from nanovllm.utils import cdiv  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
NOTEBOOKS = ["06_sampling", "07_cuda_graphs_and_compile", "08_triton_kernels"]


@pytest.fixture(scope="module")
def ch06():
    return load_chapter("06_sampling")


@pytest.fixture(scope="module")
def ch07():
    return load_chapter("07_cuda_graphs_and_compile")


@pytest.fixture(scope="module")
def ch08():
    pytest.importorskip("triton")
    return load_chapter("08_triton_kernels")


@pytest.fixture(scope="module")
def tk():
    return interpreted_triton_kernels()


@pytest.fixture(scope="module")
def tiny_llm(tiny_qwen3):
    path, _ = tiny_qwen3
    return LLM(path, dtype="float32", num_kvcache_blocks=64, kvcache_block_size=4, max_num_batched_tokens=256,
               enforce_eager=True)


# -- chapter 06: sampling ----------------------------------------------------------------------------
def _logits(rows=12, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


@pytest.mark.parametrize("k,p", [(0, 1.0), (1, 1.0), (7, 1.0), (0, 0.3), (0, 0.9), (20, 0.8), (5, 0.05)])
def test_masks_match_apply_top_k_top_p(ch06, k, p):
    logits = _logits(seed=k + int(100 * p))
    ours = ch06.top_p_mask(ch06.top_k_mask(logits, k), p)
    theirs = sampler.apply_top_k_top_p(logits, torch.full((len(logits),), k), torch.full((len(logits),), p))
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    assert torch.equal(ours[ours.isfinite()], theirs[theirs.isfinite()])


@pytest.mark.parametrize("t,k,p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 10, 1.0), (0.5, 30, 0.6)])
def test_sample_draws_the_package_tokens_from_the_same_noise(ch06, t, k, p):
    logits = _logits(rows=32, seed=3)
    ours = ch06.sample(logits, t, k, p, generator=torch.Generator().manual_seed(9))
    theirs = sampler.sample(logits, torch.full((32,), t), torch.full((32,), k), torch.full((32,), p),
                            default_generator=torch.Generator().manual_seed(9))
    assert torch.equal(ours, theirs)


def test_engine_sampler_draws_the_chapter_tokens_for_seeded_requests(ch06):
    from nanovllm.engine.sequence import Sequence

    logits = _logits(rows=6, seed=8)
    t, k, p = 0.9, 40, 0.85
    seqs = []
    for i in range(6):  # as LLM._make_seq: a seeded request carries its own generator
        seq = Sequence(i, [1, 2, 3], SamplingParams(temperature=t, top_k=k, top_p=p, seed=100 + i))
        seq.generator = torch.Generator().manual_seed(100 + i)
        seqs.append(seq)
    engine = sampler.Sampler(torch.device("cpu"), seed=0)(logits, seqs)
    ours = [int(ch06.sample(logits[i:i + 1], t, k, p, generator=torch.Generator().manual_seed(100 + i))[0])
            for i in range(6)]
    assert engine.tolist() == ours
    assert len(set(ours)) > 1  # the rows did draw different tokens


def test_temperature_and_greedy(ch06):
    logits = _logits()
    assert torch.equal(ch06.greedy(logits), logits.argmax(-1))
    torch.testing.assert_close(ch06.temperature_probs(logits, 0.7), torch.softmax(logits / 0.7, -1))


def test_exponential_race_draws_from_p(ch06):
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    n = 40_000
    noise = torch.empty(n, 5).exponential_(generator=torch.Generator().manual_seed(4))
    freq = torch.bincount(ch06.exponential_race(p.expand(n, -1), noise), minlength=5) / n
    assert (freq - p).abs().max() < 0.01


def test_gumbel_max_picks_the_race_token(ch06):
    logits = _logits(rows=64, vocab=500, seed=5).double()
    u = torch.rand(64, 500, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for t in (0.5, 1.0, 2.0):
        race = ch06.exponential_race(torch.softmax(logits / t, -1), -torch.log(u))
        assert torch.equal(ch06.gumbel_max(logits, t, u), race)


# -- chapter 07: op counts, static-buffer decode step, overlapped loop ---------------------------------
def test_count_ops_separates_views(ch07):
    ops, views = ch07.count_ops(lambda x: (x * 2).sin().view(-1), torch.randn(3, 4))
    assert dict(ops) == {"mul": 1, "sin": 1}
    assert dict(views) == {"view": 1}


def _prefilled_decode_batch(llm, n, seed):
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i in range(n):
        llm.add_request(torch.randint(0, 500, (5 + 3 * i,), generator=g).tolist(), params)
    batch, _ = llm.step()
    assert batch.is_prefill
    return llm.scheduler.schedule()


def _graphed(ch07, llm, max_batch=4):
    width = cdiv(llm.config.max_model_len, llm.config.kvcache_block_size)
    return ch07.GraphedDecode(llm.runner.model, max_batch, width, llm.hf_config.hidden_size,
                              llm.config.max_model_len, llm.dtype, llm.device)


def _eager_hidden(llm, batch):
    ids, positions, meta, _ = llm.runner.prepare(batch)
    with torch.inference_mode():
        return llm.runner.model(ids, positions, meta).clone()


@pytest.mark.parametrize("n", [1, 3])
def test_graphed_decode_matches_the_eager_step_and_the_engines_buffers(ch07, tiny_llm, n):
    llm = tiny_llm
    batch = _prefilled_decode_batch(llm, n, seed=n)
    try:
        eager = _eager_hidden(llm, batch)
        step = _graphed(ch07, llm)
        ours = step(batch.seqs, llm.config.kvcache_block_size)
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
        # the static buffers hold what the engine's DecodeGraphs puts in its own (padding rows included)
        ints = np.zeros((3, 4), dtype=np.int64)
        context_lens = np.zeros(4, dtype=np.int32)
        tables = np.zeros(tuple(step.block_tables.shape), dtype=np.int32)
        fill_decode_inputs(batch.seqs, llm.config.kvcache_block_size, ints, context_lens, tables)
        for buf, want in [(step.input_ids, ints[0]), (step.positions, ints[1]), (step.slot_mapping, ints[2]),
                          (step.context_lens, context_lens), (step.block_tables, tables)]:
            assert torch.equal(buf, torch.from_numpy(want))
        assert torch.equal(step.slot_mapping[n:], torch.full((4 - n,), -1))  # padding rows store nothing
    finally:
        llm.abort_all()


def test_graphed_decode_takes_pending_tokens_from_the_device(ch07, tiny_llm):
    llm = tiny_llm
    batch = _prefilled_decode_batch(llm, 3, seed=7)
    last = [seq.token_ids[-1] for seq in batch.seqs]
    try:
        eager = _eager_hidden(llm, batch)
        for seq in batch.seqs:  # each sequence's newest token becomes pending: counted, its value elsewhere
            seq.token_ids.pop()
            seq.num_pending_tokens = 1
        prev_tokens = torch.tensor([0, *reversed(last)])  # a previous launch's tokens, in another order
        ours = _graphed(ch07, llm)(batch.seqs, llm.config.kvcache_block_size, prev_tokens, [3, 2, 1])
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    finally:
        for seq, token in zip(batch.seqs, last):
            if seq.num_pending_tokens:
                seq.token_ids.append(token)
                seq.num_pending_tokens = 0
        llm.abort_all()


def test_overlapped_loop_gives_the_plain_loops_tokens(ch07, tiny_llm):
    llm = tiny_llm
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14], [20, 21]]
    free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    stop = free[0].token_ids[4]  # a token request 0 produces: it must stop there, one step into an overlap
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]),
              SamplingParams(temperature=0.9, max_tokens=10, seed=5),
              SamplingParams(temperature=0, max_tokens=3),
              SamplingParams(temperature=1.2, top_p=0.8, max_tokens=7, seed=11)]
    plain = llm.generate(prompts, params, use_tqdm=False)
    assert plain[0].finish_reason == "stop"
    loop = ch07.OverlappedDecode(OverlapScheduler(llm.config, llm.block_manager), llm.runner, _graphed(ch07, llm))
    launches = []  # (sequences, of which with a pending token) per launch
    launch = loop.launch_decode
    loop.launch_decode = lambda seqs: launches.append((len(seqs), sum(s.num_pending_tokens for s in seqs))) \
        or launch(seqs)
    overlapped = ch07.generate_overlapped(llm, loop, prompts, params)
    assert overlapped == [o.token_ids for o in plain]
    assert len(launches) >= 5 and launches[0] == (4, 0)  # the decode steps did run ahead
    assert all(n == pending for n, pending in launches[1:])  # each on the previous launch's pending tokens
    assert not loop.scheduler.has_unfinished() and not llm.has_unfinished_requests()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


# -- chapter 08: Triton kernels against the reference ------------------------------------------------
def _paged(ctx_lens, block_size, kv_heads, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(ctx_lens), max(need) + 1), -1, dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = perm[sum(need[:i]):sum(need[:i]) + n].to(torch.int32)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (k_cache, v_cache, tables, lens)]


def test_store_kv_matches_reference_and_package(ch08, tk):
    g = torch.Generator().manual_seed(0)
    n, kv_heads, head_dim, block_size, num_blocks = 13, 3, 64, 4, 8
    k, v = (torch.randn(n, kv_heads, head_dim, generator=g).to(DEVICE) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n].to(DEVICE)
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=DEVICE) for _ in range(6)]
    ch08.store_kv(k, v, caches[0], caches[1], slots)
    torch_ref.store_kvcache_ref(k, v, caches[2], caches[3], slots)
    tk.store_kvcache(k, v, caches[4], caches[5], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert torch.equal(caches[0], caches[4]) and torch.equal(caches[1], caches[5])


@pytest.mark.parametrize("tile", [1, 5, 64])
def test_online_attention(ch08, tile):
    g = torch.Generator().manual_seed(tile)
    q, k, v = torch.randn(16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    torch.testing.assert_close(ch08.online_attention(q, k, v, 0.25, tile), torch.softmax(k @ q * 0.25, 0) @ v)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,ctx_lens,block_n", [
    (9, 3, 64, 16, [1, 17, 40], 32),  # SmolLM2's shape
    (4, 4, 32, 4, [9, 3], 16),  # no GQA, small blocks: a tile spans several blocks
    (8, 2, 16, 8, [50], 16),
])
def test_paged_decode_matches_reference(ch08, heads, kv_heads, head_dim, block_size, ctx_lens, block_n):
    k_cache, v_cache, tables, lens = _paged(ctx_lens, block_size, kv_heads, head_dim, seed=heads)
    q = torch.randn(len(ctx_lens), heads, head_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = ch08.paged_decode(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, block_n=block_n)
    ref = torch_ref.paged_decode_ref(q, k_cache, v_cache, lens, tables, head_dim ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_merge_partials_is_exact(ch08, tk):
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(8, generator=g), torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    s = k @ q
    pieces = [(0, 4), (4, 21), (21, 30)]
    outs = torch.stack([torch.softmax(s[a:b], 0) @ v[a:b] for a, b in pieces])
    lses = torch.stack([torch.logsumexp(s[a:b], 0) for a, b in pieces])
    torch.testing.assert_close(ch08.merge_partials(outs, lses), torch.softmax(s, 0) @ v)


# -- the committed notebooks -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_commit_clean(name):
    text = (CHAPTERS / f"{name}.ipynb").read_text()
    nb = json.loads(text)
    assert not re.search(r"/(work|tmp|root|home)/", text), "a machine path in the notebook"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("export" in c.get("metadata", {}).get("tags", []) for c in code)
    for c in code:
        if c.get("outputs"):
            assert c["execution_count"] is not None, "kept outputs need their execution count (nbval)"
        assert not any(o.get("output_type") == "error" for o in c.get("outputs", [])), "an error output"
    assert all(not "".join(c["source"]).startswith("!") for c in code)
