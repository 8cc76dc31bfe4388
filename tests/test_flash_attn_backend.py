"""The flash-attn backend's plumbing, through a stand-in module with flash-attn 2's documented signatures
(the real package has no wheels on PyPI and cannot be built here; see the README for what ran on a GPU)."""

import sys
from pathlib import Path

import pytest
from conftest import hf_greedy

from nanovllm import LLM, SamplingParams

STANDIN = Path(__file__).parent / "flash_attn_standin"


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.syspath_prepend(str(STANDIN))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


def test_flash_attn_backend_matches_hf(standin, tiny_qwen3):
    path, hf = tiny_qwen3
    llm = LLM(path, device="cpu", attention_backend="flash_attn", num_kvcache_blocks=8,
              max_num_batched_tokens=64, max_model_len=1024)
    assert llm.runner.backend.name == "flash_attn"
    assert llm.config.kvcache_block_size == 256, "the block size follows the backend"
    prefix = list(range(20, 300))
    prompts = [prefix + [5, 6, 7], prefix + [9], list(range(40, 60))]  # shared prefix, chunked prefill
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for _ in range(2):  # the second round hits the prefix cache: prefill reads cached blocks
        outs = llm.generate(prompts, params, use_tqdm=False)
        for p, o in zip(prompts, outs):
            assert o.token_ids == hf_greedy(hf, p, 12)
    assert outs[0].num_cached_tokens == 256
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_auto_never_picks_flash_attn_on_cpu(standin, tiny_qwen3):
    llm = LLM(tiny_qwen3[0], device="cpu", num_kvcache_blocks=8)
    assert llm.runner.backend.name == "torch"
    assert llm.config.kvcache_block_size == 16


def test_auto_does_not_pick_flash_attn_until_it_has_run_on_hardware(standin, monkeypatch):
    import torch

    from nanovllm.attention import backend_class, resolve_backend_name

    cls = backend_class("flash_attn")
    monkeypatch.setattr(cls, "usable", classmethod(lambda c, device, dtype: True))  # as on a GPU it supports
    assert cls.usable(torch.device("cpu"), torch.float16)
    assert resolve_backend_name("auto", torch.device("cpu"), torch.float16) != "flash_attn"
    assert resolve_backend_name("flash_attn", torch.device("cpu"), torch.float16) == "flash_attn"  # by name


def test_flash_attn4_alone_is_not_flash_attn_2(tmp_path, monkeypatch):
    """flash-attn 4's wheel installs flash_attn/cute/ without flash_attn/__init__.py: ``import flash_attn``
    then works (a namespace package) but flash-attn 2's functions are not there."""
    import torch

    from nanovllm.attention.flash_attn import flash_attn_usable

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not flash_attn_usable(torch.device("cuda"))
