"""From what the user passed (``model``, ``device``, ``dtype``) to a ``ResolvedModel``: a local HF-style folder,
its config, the device and the dtype the engine runs it in; and the model's tokenizer and end-of-sequence ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nanovllm.models import MODEL_REGISTRY, model_class

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
_DTYPE_HINT = "use 'auto', 'float32', 'bfloat16' or 'float16' (or one of those torch dtypes)"

# The sizes the model is built from.  transformers fills a missing one with a default of its own (hidden_size
# 4096 ...), and loading then fails on a tensor's size, so a config.json must state them
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json")


@dataclass(frozen=True)
class ResolvedModel:
    """What a runner needs to build the model: where it is, its HF config, where and in what it runs."""

    folder: Path
    hf_config: object
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, model: str | Path, device="auto", dtype="auto") -> ResolvedModel:
        device = resolve_device(device)
        folder = resolve_model(model)
        hf_config = read_config(folder)
        return cls(folder, hf_config, device, resolve_dtype(dtype, device, hf_config))

    @property
    def model_class(self):
        return model_class(self.hf_config)


def resolve_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dev


def resolve_dtype(dtype, device: torch.device, hf_config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype={dtype}: {_DTYPE_HINT}")
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        cfg = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        cfg = _DTYPES.get(str(cfg).removeprefix("torch."), torch.bfloat16)
        return torch.bfloat16 if cfg == torch.float32 else cfg
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"unknown dtype={dtype!r}: {_DTYPE_HINT}")
    return _DTYPES[dtype]


def resolve_model(model: str | Path) -> Path:
    """A local folder holding config.json + *.safetensors (+ tokenizer files, optional).

    Accepts the embedded default's name, a folder, a .gguf file (converted once, then cached), or a
    hub id when the hub is reachable."""
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a path or a name, got {type(model).__name__}")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(model)!r} has no config.json")
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            from nanovllm.loading import embedded

            return embedded.gguf_model_dir(path)
        raise OSError(f"model {str(model)!r} is a file but not a .gguf file; pass a model folder instead")
    from nanovllm.loading import embedded

    if embedded.is_embedded_name(str(model)):
        return embedded.embedded_model_dir()
    looks_like_hub_id = isinstance(model, str) and model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as e:  # offline, unknown id, gated repo ...
            raise OSError(f"model {model!r} is not a local path, and fetching it from the hub failed: {e}") from e
    raise FileNotFoundError(f"model {str(model)!r}: no such file or folder")


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; a ValueError naming the file if it is not valid JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), found a {type(data).__name__}")
    return data


def read_config(model_dir: Path):
    """The model's transformers config, after checking that we support its architecture and that it states
    every size the model is built from."""
    path = model_dir / "config.json"
    raw = read_json(path)
    check_architectures(raw, path)
    check_sizes(raw, path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # transformers' own checks name no file
        raise ValueError(f"{path}: transformers cannot read it: {type(e).__name__}: {e}") from e


def check_architectures(raw: dict, path: Path) -> None:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{path}: 'architectures' must be a list of names such as ['Qwen3ForCausalLM'], "
                         f"found {archs!r}")
    if not any(a in MODEL_REGISTRY for a in archs):
        raise ValueError(f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; "
                         f"supported: {sorted(MODEL_REGISTRY)}")


def check_sizes(raw: dict, path: Path) -> None:
    for key in _REQUIRED_SIZES + _OPTIONAL_SIZES:
        value = raw.get(key)
        if value is None and key in _OPTIONAL_SIZES:
            continue
        if key not in raw:
            raise ValueError(f"{path}: {key!r} is missing (a positive integer that the model is built from)")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: {key!r} must be a positive integer, found {value!r}")


def read_eos_token_ids(model_dir: Path, hf_config) -> tuple[int, ...]:
    """End-of-sequence ids as HF's generate sees them: generation_config.json first, else config.json."""
    eos, source = None, model_dir / "generation_config.json"
    if source.is_file():
        eos = read_json(source).get("eos_token_id")
    if eos is None:
        eos, source = getattr(hf_config, "eos_token_id", None), model_dir / "config.json"
    if eos is None:
        return ()
    ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{source}: 'eos_token_id' must be a token id or a list of them, found {eos!r}")
    return tuple(ids)


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, or None when the folder has none (token-id prompts still work)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((model_dir / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers names no file: find the broken one, else name them all
        present = [n for n in (*_TOKENIZER_JSON, "tokenizer.model") if (model_dir / n).is_file()]
        for name in present:
            if name.endswith(".json"):
                read_json(model_dir / name)
        raise OSError(f"cannot load the tokenizer in {model_dir} ({', '.join(present)}): "
                      f"{type(e).__name__}: {e}") from e
