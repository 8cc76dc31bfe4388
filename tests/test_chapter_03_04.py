"""Chapters 03 (paged KV cache) and 04 (prefix caching): the from-scratch pieces, imported from the notebooks'
``export`` cells, must agree with the package; and the committed notebooks must stay clean.

Run as a script to strip what a notebook run leaves that must not be committed (widget state and widget views,
whose model ids are random; execution timestamps)::

    python tests/test_chapter_03_04.py chapters/03_paged_kv.ipynb chapters/04_prefix_caching.ipynb
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbimport import CHAPTERS, load_chapter  # noqa: E402

from nanovllm.attention import torch_ref  # noqa: E402
from nanovllm.engine.block_manager import BlockManager, block_hash  # noqa: E402
from nanovllm.engine.sequence import Sequence  # noqa: E402

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
NOTEBOOKS = ["03_paged_kv", "04_prefix_caching"]


@pytest.fixture(scope="module")
def ch03():
    return load_chapter("03_paged_kv")


@pytest.fixture(scope="module")
def ch04():
    return load_chapter("04_prefix_caching")


# -- chapter 03: blocks, block tables, slot mapping ---------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_allocator_matches_block_manager(ch03, seed):
    rng = random.Random(seed)
    ours = ch03.PagedAllocator(num_blocks=20, block_size=4)
    bm = BlockManager(20, 4, enable_prefix_caching=False)
    live: dict[int, Sequence] = {}
    for i in range(300):
        op = rng.random()
        if op < 0.35:
            seq = Sequence(i, [0] * rng.randint(1, 14))
            assert ours.can_allocate(len(seq)) == bm.can_allocate(seq)
            if bm.can_allocate(seq):
                assert ours.allocate(i, len(seq)) == (bm.allocate(seq) or seq.block_table)
                live[i] = seq
        elif op < 0.75 and live:
            seq = live[rng.choice(sorted(live))]
            seq.token_ids.append(0)
            if bm.can_append(seq):
                bm.append_slot(seq)
                assert ours.grow(seq.seq_id, len(seq)) == seq.block_table
            else:
                seq.token_ids.pop()
        elif live:
            seq = live.pop(rng.choice(sorted(live)))
            bm.deallocate(seq)
            ours.release(seq.seq_id)
        assert ours.tables == {i: s.block_table for i, s in live.items()}
        assert list(ours.free) == list(bm.free)


def test_slot_mapping_matches_the_runner(ch03, tiny_llm):
    from nanovllm.engine.sequence import ScheduledBatch

    bs = tiny_llm.config.kvcache_block_size
    a, b = Sequence(100, list(range(11))), Sequence(101, list(range(9)))
    a.block_table, b.block_table = [7, 2, 5], [1, 8, 3]
    b.num_computed_tokens = 5  # a chunk: tokens 5..8
    _, _, meta, _ = tiny_llm.runner.prepare(ScheduledBatch([a, b], [11, 4], is_prefill=True))
    expected = ch03.slot_mapping(a.block_table, 0, 11, bs) + ch03.slot_mapping(b.block_table, 5, 9, bs)
    assert meta.slot_mapping.tolist() == expected
    assert expected[:5] == [7 * bs, 7 * bs + 1, 7 * bs + 2, 7 * bs + 3, 2 * bs]


def _random_batch(seed, heads=8, kv_heads=2, head_dim=16, block_size=4, num_blocks=40):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    ctx = [int(x) for x in torch.randint(1, 30, (4,), generator=g)]
    qlen = [int(torch.randint(1, c + 1, (1,), generator=g)) for c in ctx]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for c in ctx:
        n = -(-c // block_size)
        tables.append(perm[start:start + n])
        start += n
    q = torch.randn(sum(qlen), heads, head_dim, generator=g)
    return q, k_cache, v_cache, tables, qlen, ctx


@pytest.mark.parametrize("seed", range(6))
def test_paged_attention_matches_torch_ref(ch03, seed):
    q, k_cache, v_cache, tables, qlen, ctx = _random_batch(seed)
    scale = 0.25
    ours = ch03.paged_attention(q, k_cache, v_cache, tables, qlen, ctx, scale)
    padded = torch.full((len(tables), max(map(len, tables))), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        padded[i, :len(t)] = torch.tensor(t)
    cu = torch.tensor([0] + torch.tensor(qlen).cumsum(0).tolist(), dtype=torch.int32)
    ref = torch_ref.paged_attention_ref(q, k_cache, v_cache, cu, torch.tensor(ctx), padded, scale)
    torch.testing.assert_close(ours, ref)
    # padded rows (the engine's format) work too
    torch.testing.assert_close(ch03.paged_attention(q, k_cache, v_cache, padded, qlen, ctx, scale), ref)
    # decode: one query per sequence
    qd = q[cu[1:].long() - 1]
    torch.testing.assert_close(ch03.paged_attention(qd, k_cache, v_cache, tables, [1] * len(ctx), ctx, scale),
                               torch_ref.paged_decode_ref(qd, k_cache, v_cache, torch.tensor(ctx), padded, scale))


def test_store_kv_then_gather_round_trips(ch03):
    k_cache = torch.zeros(6, 4, 2, 3)
    v_cache = torch.zeros_like(k_cache)
    table = [4, 0, 2]
    k, v = torch.randn(10, 2, 3), torch.randn(10, 2, 3)
    ch03.store_kv(k_cache, v_cache, k, v, torch.tensor(ch03.slot_mapping(table, 0, 10, 4)))
    torch.testing.assert_close(ch03.gather(k_cache, table, 10), k)
    torch.testing.assert_close(ch03.gather(v_cache, table, 10), v)
    torch.testing.assert_close(ch03.gather(k_cache, table, 10), torch_ref.gather_kv(k_cache, torch.tensor(table), 10))


@pytest.fixture(scope="module")
def tiny_llm(tiny_qwen3):
    from nanovllm import LLM

    path, _ = tiny_qwen3
    return LLM(path, num_kvcache_blocks=12, kvcache_block_size=4, max_num_batched_tokens=16,
               enable_prefix_caching=False, enforce_eager=True, dtype="float32")


def test_scratch_backend_gives_the_engine_the_same_tokens(ch03, tiny_llm):
    from nanovllm import SamplingParams

    class CountingBackend(ch03.ScratchBackend):  # the chapter's backend, counting its calls
        calls = 0

        def forward(self, *args):
            self.calls += 1
            return super().forward(*args)

    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    before = tiny_llm.scheduler.num_preemptions
    expected = [o.token_ids for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    assert tiny_llm.scheduler.num_preemptions > before  # the tiny cache makes the engine preempt
    engine_model, backend = tiny_llm.runner.model, CountingBackend()
    with ch03.model_with_backend(tiny_llm, backend) as model:
        assert tiny_llm.runner.model is model is not engine_model
        # the engine's weights, shared rather than copied
        assert model.embed_tokens.weight.data_ptr() == engine_model.embed_tokens.weight.data_ptr()
        got = [o.token_ids for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    assert tiny_llm.runner.model is engine_model
    assert backend.calls >= 12 * tiny_llm.hf_config.num_hidden_layers  # every step of every layer went through it
    assert got == expected


# -- chapter 04: hashes, ref counts, LRU --------------------------------------------------------------
def test_hashes_match_the_package(ch04):
    toks = list(range(50))
    h, expected = None, []
    for i in range(3):
        h = block_hash(toks[i * 16:(i + 1) * 16], h)
        expected.append(h)
    assert ch04.prefix_hashes(toks, 16) == expected
    assert ch04.hash_block(toks[:16], None) == block_hash(toks[:16], None)
    assert ch04.prefix_hashes(toks[:15], 16) == []


def _same_state(ours, bm, live):
    assert ours.tables == {i: s.block_table for i, s in live.items()}
    assert [b.ref_count for b in ours.blocks] == [b.ref_count for b in bm.blocks]
    assert [b.hash for b in ours.blocks] == [b.hash for b in bm.blocks]
    assert list(ours.free) == list(bm.free)
    assert ours.cached == bm.hash_to_block
    assert (ours.hit_tokens, ours.queried_tokens) == (bm.hit_tokens, bm.queried_tokens)


@pytest.mark.parametrize("seed", range(8))
def test_prefix_caching_allocator_matches_block_manager(ch04, seed):
    rng = random.Random(seed)
    bs = 4
    prefixes = [[rng.randrange(20) for _ in range(rng.randrange(0, 14))] for _ in range(3)]
    ours = ch04.PrefixCachingAllocator(num_blocks=16, block_size=bs)
    bm = BlockManager(16, bs, enable_prefix_caching=True)
    live: dict[int, Sequence] = {}
    for i in range(400):
        op = rng.random()
        if op < 0.3:
            toks = rng.choice(prefixes) + [rng.randrange(20) for _ in range(rng.randint(1, 8))]
            seq = Sequence(i, toks)
            assert ours.can_allocate(toks) == bm.can_allocate(seq)
            if bm.can_allocate(seq):
                cached = ours.allocate(i, toks)
                bm.allocate(seq)
                assert cached == seq.num_computed_tokens
                live[i] = seq
        elif op < 0.6 and live:  # a step computes some of a sequence's tokens
            seq = live[rng.choice(sorted(live))]
            if seq.num_uncomputed_tokens:
                seq.num_computed_tokens += rng.randint(1, seq.num_uncomputed_tokens)
                bm.register_computed(seq)
                ours.register(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        elif op < 0.8 and live:  # a decode step appends a token
            seq = live[rng.choice(sorted(live))]
            if seq.num_uncomputed_tokens == 0:
                seq.token_ids.append(rng.randrange(20))
                if bm.can_append(seq):
                    bm.append_slot(seq)
                    ours.grow(seq.seq_id, len(seq))
                else:
                    seq.token_ids.pop()
        elif live:
            seq = live.pop(rng.choice(sorted(live)))
            bm.deallocate(seq)
            ours.release(seq.seq_id)
        _same_state(ours, bm, live)


def test_lru_keeps_the_head_of_a_prefix_longest(ch04):
    ours = ch04.PrefixCachingAllocator(num_blocks=6, block_size=4)
    toks = list(range(12))
    ours.allocate(0, toks)
    ours.register(0, toks, 12)
    ours.release(0)
    assert list(ours.free)[-3:] == [2, 1, 0]  # tail first, head last
    ours.allocate(1, list(range(100, 120)))  # 5 fresh blocks: evicts the tail and the middle
    assert ours.lookup(toks + [99]) == [0]


# -- the committed notebooks -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_commit_clean(name):
    text = (CHAPTERS / f"{name}.ipynb").read_text()
    nb = json.loads(text)
    assert "widgets" not in nb["metadata"], "widget state saved in the notebook: run this file as a script"
    assert not any("execution" in c["metadata"] for c in nb["cells"]), "execution timestamps: run this file as a script"
    assert WIDGET_VIEW not in text, "widget views (random model ids) saved: run this file as a script"
    assert not re.search(r"/(work|tmp|root|home)/", text), "a machine path in the notebook"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("export" in c.get("metadata", {}).get("tags", []) for c in code)
    for c in code:
        if c.get("outputs"):
            assert c["execution_count"] is not None, "kept outputs need their execution count (nbval)"
        src = "".join(c["source"])
        if "BlockTableViewer(" in src:
            assert src.startswith("# NBVAL_IGNORE_OUTPUT")
    assert all(not src.startswith("!") for src in ("".join(c["source"]) for c in code))


def strip_widgets(path: Path) -> None:
    """Drop what an executed notebook must not commit: widget state, widget views (keeping their text
    fallback) and the cells' execution timestamps."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            out.get("data", {}).pop(WIDGET_VIEW, None)
    nbformat.write(nb, path)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        strip_widgets(Path(arg))
