"""From what the user passed as ``model=`` to a local HF-style folder, its config and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from nanovllm.models import MODEL_REGISTRY


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
