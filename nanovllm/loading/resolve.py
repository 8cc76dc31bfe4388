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
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        cfg = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        cfg = _DTYPES.get(str(cfg).removeprefix("torch."), torch.bfloat16)
        return torch.bfloat16 if cfg == torch.float32 else cfg
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
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


def read_config(model_dir: Path):
    """The model's transformers config, after checking that we support its architecture."""
    raw = json.loads((model_dir / "config.json").read_text())
    archs = raw.get("architectures") or []
    if not any(a in MODEL_REGISTRY for a in archs):
        raise ValueError(f"unsupported architecture {archs or raw.get('model_type')!r} in {model_dir.name}; "
                         f"supported: {sorted(MODEL_REGISTRY)}")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def read_eos_token_ids(model_dir: Path, hf_config) -> tuple[int, ...]:
    """End-of-sequence ids as HF's generate sees them: generation_config.json first, else config.json."""
    eos = None
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, or None when the folder has none (token-id prompts still work)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((model_dir / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
