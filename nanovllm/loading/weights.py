"""Read safetensors checkpoints into a model; each rank reads only the slices it keeps."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nanovllm.layers.linear import default_weight_loader


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    params = dict(model.named_parameters())
    loaded = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                target = model.checkpoint_name_to_param(name)
                if target is None:
                    continue
                pname, shard = target
                if pname not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
                param = params[pname]
                loader = getattr(param, "weight_loader", default_weight_loader)
                tensor = f.get_slice(name)
                loader(param, tensor, shard) if shard is not None else loader(param, tensor)
                loaded.add((pname, shard))
    missing = {n for n in params if not any(n == p for p, _ in loaded)}
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights for: {sorted(missing)[:8]}")
