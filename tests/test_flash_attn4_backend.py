"""The flash-attn 4 backend's plumbing, through a stand-in ``flash_attn.cute`` with flash-attn-4's signature and
asserts (tests/flash_attn_standin/flash_attn/cute/): the real package compiles kernels for Hopper/Blackwell GPUs
only; ``tests/gpu/fa4_check.py`` is the run on one."""

import sys
from pathlib import Path

import pytest
import torch

from nanovllm import LLM, SamplingParams

STANDIN = Path(__file__).parent / "flash_attn_standin"
CPU = torch.device("cpu")


def _forget_flash_attn(monkeypatch):
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.syspath_prepend(str(STANDIN))
    _forget_flash_attn(monkeypatch)
    yield
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


@pytest.fixture
def no_flash_attn(monkeypatch):
    """flash_attn.cute cannot be imported (as on this machine, whatever is installed)."""
    _forget_flash_attn(monkeypatch)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)


def spy(llm):
    """Record which of the backend's three calls the engine makes: 'varlen' (prefill, no cached prefix),
    'paged' (prefill over the cache) and 'decode'."""
    backend, calls = llm.runner.backend, set()
    real = backend.varlen

    def varlen(q, k, v, **kw):
        calls.add("decode" if q.dim() == 4 else "paged" if "page_table" in kw else "varlen")
        return real(q, k, v, **kw)

    backend.varlen = varlen
    return calls


PREFIX = list(range(20, 300))
PROMPTS = [PREFIX + [5, 6, 7], PREFIX + [9], list(range(40, 60)), [7], list(range(100, 230))]  # mixed lengths


@pytest.mark.parametrize("block_size,mixed", [(16, False), (128, False), (16, True)])
def test_tokens_equal_the_torch_backends(standin, tiny_qwen3, block_size, mixed):
    """Prefill, prefix-cached prefill (second round), chunked prefill (64-token steps), decode, a batch of mixed
    lengths; with block size 16 (the engine's, cp.async pages on a GPU) and 128 (a page per key tile: TMA)."""
    path, _ = tiny_qwen3
    args = dict(device="cpu", kvcache_block_size=block_size, num_kvcache_blocks=4096 // block_size,
                max_num_batched_tokens=64, max_model_len=1024, mixed_batches=mixed)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = LLM(path, attention_backend="torch", **args)
    want = [o.token_ids for o in ref.generate(PROMPTS, params, use_tqdm=False)]
    llm = LLM(path, attention_backend="flash_attn4", **args)
    assert llm.runner.backend.name == "flash_attn4"
    assert llm.config.kvcache_block_size == block_size, "any block size suits flash-attn 4"
    calls = spy(llm)
    for _ in range(2):  # the second round hits the prefix cache: prefill reads cached blocks
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.token_ids for o in outs] == want
    assert outs[0].num_cached_tokens >= 256
    assert calls == {"varlen", "paged", "decode"}
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_auto_never_picks_flash_attn4(standin, monkeypatch, tiny_qwen3):
    from nanovllm.attention import AUTO_ORDER, backend_class, resolve_backend_name

    assert "flash_attn4" not in AUTO_ORDER
    cls = backend_class("flash_attn4")
    assert not cls.usable(CPU, torch.float32) and not cls.usable(CPU, torch.bfloat16)  # only on CUDA
    monkeypatch.setattr(cls, "usable", classmethod(lambda c, device, dtype: True))  # as on a GPU it supports
    assert resolve_backend_name("auto", CPU, torch.bfloat16) != "flash_attn4"
    assert resolve_backend_name("flash_attn4", CPU, torch.bfloat16) == "flash_attn4"  # by name
    assert LLM(tiny_qwen3[0], device="cpu", num_kvcache_blocks=8).runner.backend.name == "torch"


def test_fp8_kv_cache_is_refused_clearly(standin, tiny_qwen3):
    from nanovllm.attention import check_runs_here
    from nanovllm.attention.flash_attn4 import FlashAttn4Backend

    assert not FlashAttn4Backend.fp8_kv_usable(torch.device("cuda"))
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*flash_attn4"):
        check_runs_here("flash_attn4", CPU, "fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*flash_attn4"):
        LLM(str(tiny_qwen3[0]), device="cpu", attention_backend="flash_attn4", kv_cache_dtype="fp8")
    backend = FlashAttn4Backend()
    for call in (lambda s: backend.forward(None, None, None, None, None, None, 1.0, s, s),
                 lambda s: backend.store_kv(None, None, None, None, None, s, s)):
        with pytest.raises(ValueError, match="flash_attn4 backend does not support kv_cache_dtype='fp8'"):
            call(torch.ones(1))


def test_asked_for_by_name_where_it_cannot_run(no_flash_attn, tiny_qwen3):
    with pytest.raises(ValueError, match="'flash_attn4' cannot run on device 'cpu': the flash-attn-4 package "
                                         r"\(module flash_attn.cute\) is not installed.*Hopper"):
        LLM(str(tiny_qwen3[0]), device="cpu", attention_backend="flash_attn4")


def test_the_real_package_on_a_cpu_or_an_older_gpu_is_refused(standin, monkeypatch):
    """As the real package would be (no RUNS_ON_CPU): a CPU, a GPU other than 9.x/10.x, or float32 is refused."""
    import flash_attn.cute

    from nanovllm.attention import check_runs_here
    from nanovllm.attention.flash_attn4 import why_not_here

    monkeypatch.setattr(flash_attn.cute, "RUNS_ON_CPU", False)
    with pytest.raises(ValueError, match="'flash_attn4' cannot run on device 'cpu': its kernels need a CUDA GPU"):
        check_runs_here("flash_attn4", CPU, "auto", torch.float32)
    gpu = torch.device("cuda")
    for capability, dtype, why in [((8, 0), torch.bfloat16, "compute capability 9.x or 10.x and this GPU is 8.0"),
                                   ((12, 0), torch.float16, "this GPU is 12.0"),
                                   ((9, 0), torch.float32, "float16 or bfloat16, not torch.float32"),
                                   ((9, 0), torch.bfloat16, None), ((10, 0), torch.float16, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        got = why_not_here(gpu, dtype)
        assert got is None if why is None else why in got, (capability, dtype, got)


def test_the_standin_asserts_what_flash_attn4_asserts(standin):
    from flash_attn import flash_attn_varlen_func as fa2
    from flash_attn.cute import flash_attn_varlen_func as fa4

    assert fa2 is not fa4  # both stand-ins, side by side, as the real flash_attn and flash_attn.cute
    pool = torch.zeros(4, 16, 2, 32)
    q = torch.randn(3, 4, 32)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    used = torch.tensor([5, 20], dtype=torch.int32)
    table = torch.tensor([[0, -1], [1, 2]], dtype=torch.int32)
    out, lse = fa4(q, pool, pool, cu_seqlens_q=cu, seqused_k=used, page_table=table, causal=True)
    assert out.shape == q.shape and lse is None
    with pytest.raises(AssertionError, match="page_table must be int32"):
        fa4(q, pool, pool, cu_seqlens_q=cu, seqused_k=used, page_table=table.long(), causal=True)
    with pytest.raises(AssertionError, match="not supported with cu_seqlens_k"):
        fa4(q, pool, pool, cu_seqlens_q=cu, cu_seqlens_k=cu, page_table=table, causal=True)
    with pytest.raises(AssertionError, match="with cu_seqlens_q, q is"):
        fa4(q.unsqueeze(1), pool, pool, cu_seqlens_q=cu, seqused_k=used, page_table=table, causal=True)
    with pytest.raises(AssertionError, match="max_seqlen_k"):
        fa4(q, pool, pool, cu_seqlens_q=cu, seqused_k=used, page_table=table, max_seqlen_k=16, causal=True)
    pool[2, 4:] = float("nan")  # past sequence 1's 20 tokens, in its last page
    with pytest.raises(AssertionError, match="must be finite"):
        fa4(q, pool, pool, cu_seqlens_q=cu, seqused_k=used, page_table=table, causal=True)
