"""Shared fixtures: tiny random-weight models of each supported architecture, saved as HF folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def make_tiny_model(arch: str, path, seed: int = 0, **overrides):
    """Save a tiny HF model of ``arch`` (qwen3 | llama | qwen2) with weights large enough that greedy
    decoding is not degenerate; returns the HF model (float32, eval)."""
    import transformers as tf

    classes = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=True)),
               "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=False)),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=False))}
    cfg_cls, model_cls, extra = classes[arch]
    cfg = cfg_cls(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    model.generation_config.eos_token_id = None  # random weights: no natural end; tests set stops explicitly
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session", params=["qwen3", "llama", "qwen2"])
def tiny_model(request, tmp_path_factory):
    """(arch, folder, HF model) for each architecture."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, path, make_tiny_model(request.param, path)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    return path, make_tiny_model("qwen3", path)


def hf_greedy(model, prompt_ids, max_new_tokens, eos_token_id=None):
    """HF transformers' greedy continuation of one prompt (token ids)."""
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def interpreted_triton_kernels():
    """``nanovllm.attention.triton_kernels`` whose kernels run here: without CUDA, under Triton's interpreter
    (the calling test module sets TRITON_INTERPRET=1 before importing anything; if the module was imported
    earlier without it, its kernels are defined again).  Skips the test when Triton is not installed."""
    import importlib

    pytest.importorskip("triton")
    module = importlib.import_module("nanovllm.attention.triton_kernels")
    if not torch.cuda.is_available() and type(module._prefill_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


# --- the lab: build exercises run against the reader's notebook cells and against the solutions ------------------

def pytest_addoption(parser):
    parser.addoption("--lab", choices=("both", "notebook", "solutions"), default="both",
                     help="which code the chapters' build exercises test: the reader's notebook cells, the "
                          "solutions in chapters/solutions/, or both (default; the reader's are skipped while "
                          "their stubs still raise NotImplementedError)")


@pytest.fixture(params=["solutions", "notebook"])
def lab_code(request):
    """``"solutions"`` or ``"notebook"``: pass it to ``load_chapter(name, code=lab_code)`` and wrap the calls
    of the reader's code in ``attempted(lab_code)``."""
    wanted = request.config.getoption("--lab", default="both")
    if wanted not in ("both", request.param):
        pytest.skip(f"--lab {wanted}")
    return request.param


class attempted:
    """``with attempted(lab_code): ...``: a stub's NotImplementedError skips the test as "not attempted" (the
    solutions must not raise it)."""

    def __init__(self, code: str):
        self.code = code

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is NotImplementedError and self.code == "notebook":
            pytest.skip("exercise not attempted: its stub still raises NotImplementedError")
        return False


def run_figure_script(name: str, tmp_path) -> None:
    """Run ``figures/<name>.py`` in a copy of figures/ (its data beside it, so the committed PNG stays as it is)
    and assert it draws ``<name>.png``."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    figures = Path(__file__).resolve().parent.parent / "figures"
    shutil.copytree(figures / "data", tmp_path / "data")
    shutil.copy(figures / f"{name}.py", tmp_path)
    result = subprocess.run([sys.executable, str(tmp_path / f"{name}.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
