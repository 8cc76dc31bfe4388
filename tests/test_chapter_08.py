"""Chapter 08's build exercise, the KV store that skips padding rows (slot -1): the reader's kernel (or the
solution's, ``--lab solutions``) must store what the package's Triton kernel stores, and must serve as the
engine's KV store with the engine's tokens unchanged.  Without a GPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set below before any kernel is defined)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import attempted, hf_greedy, interpreted_triton_kernels, make_tiny_model  # noqa: E402
from nbimport import load_chapter  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402

CHAPTER = "08_triton_kernels"


@pytest.fixture(scope="module")
def tk():
    return interpreted_triton_kernels()  # (skips the module's tests where Triton is not installed)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-08")
    return path, make_tiny_model("llama", path)


def check_store(store, tk):
    """The exercise's contract: the caches nanovllm's ``store_kvcache`` writes, padding rows (slot -1) stored
    nowhere, for several attention shapes (rows of 192, 64 and 1,024 numbers)."""
    gen = torch.Generator().manual_seed(0)
    for n, kv_heads, head_dim in [(37, 3, 64), (5, 2, 32), (4, 8, 128)]:
        k, v = (torch.randn(n, kv_heads, head_dim, generator=gen).to(DEVICE) for _ in range(2))
        slots = torch.randperm(24 * 16, generator=gen)[:n].to(DEVICE)
        slots[::3] = -1
        mine, theirs = ([torch.zeros(24, 16, kv_heads, head_dim, device=DEVICE) for _ in range(2)] for _ in range(2))
        store(k, v, *mine, slots)
        tk.store_kvcache(k, v, *theirs, slots)
        for name, a, b in zip(("keys", "values"), mine, theirs):
            assert torch.equal(a, b), f"{n} tokens of {kv_heads} x {head_dim}: the {name} cache differs"


def test_the_store_skips_padding_rows_as_the_package_does(lab_code, tk):
    ch = load_chapter(CHAPTER, code=lab_code)
    with attempted(lab_code):
        check_store(ch.store_kv_skip, tk)


def engine_tokens(path, store, prompts):
    """Greedy tokens of an engine whose attention backend stores K/V with ``store`` (the torch backend's
    attention reads the cache it wrote), and how many stores it made."""
    llm = LLM(path, device=DEVICE, dtype=torch.float32, attention_backend="torch", enforce_eager=True,
              kvcache_block_size=16, max_num_batched_tokens=32)  # 32: a prompt's prefill comes in chunks
    calls = []

    def store_kv(k, v, k_cache, v_cache, slots):
        calls.append(len(slots))
        store(k.contiguous(), v.contiguous(), k_cache, v_cache, slots)  # (k and v are slices of the QKV output)

    llm.runner.backend.store_kv = store_kv
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    finally:
        llm.shutdown()
    return [o.token_ids for o in outs], calls


def test_the_store_in_the_engine_gives_hf_tokens(lab_code, tk, tiny_llama):
    path, model = tiny_llama
    ch = load_chapter(CHAPTER, code=lab_code)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 40, 17)]
    with attempted(lab_code):
        tokens, calls = engine_tokens(path, ch.store_kv_skip, prompts)
    assert len(calls) >= 2 * 7  # two layers, at least a prefill step and six decode steps
    assert tokens == [hf_greedy(model, p, 6) for p in prompts]


def test_wrong_stores_fail_the_checks(tk, tiny_llama):
    """The checks can fail: a store that puts padding rows into slot 0, and one that swaps keys and values."""
    ch = load_chapter(CHAPTER)

    def clamped(k, v, k_cache, v_cache, slots):  # padding rows overwrite slot 0
        ch.store_kv(k, v, k_cache, v_cache, slots.clamp(min=0))

    def swapped(k, v, k_cache, v_cache, slots):  # skips padding, but keys go to the value cache
        keep = slots >= 0
        ch.store_kv(v[keep].contiguous(), k[keep].contiguous(), k_cache, v_cache, slots[keep])

    for wrong in (clamped, swapped):
        with pytest.raises(AssertionError):
            check_store(wrong, tk)
    path, model = tiny_llama
    prompts = [torch.randint(0, 512, (9,), generator=torch.Generator().manual_seed(2)).tolist()]
    tokens, _ = engine_tokens(path, swapped, prompts)
    assert tokens != [hf_greedy(model, prompts[0], 6)]
