"""Read safetensors checkpoints into a model; each rank reads only the slices it keeps.

Nothing loads silently wrong: each checkpoint tensor's whole shape is checked against what the model expects
before a rank slices it, and after the last file every piece of every parameter (q, k and v of the merged
QKV projection, gate and up of the merged MLP projection ...) must have been loaded."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nanovllm.layers.linear import checkpoint_shape, default_weight_loader, shape_of


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    params = dict(model.named_parameters())
    loaded = set()
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                target = model.checkpoint_name_to_param(name)
                if target is not None:
                    load_tensor(model, params, target, f.get_slice(name), f"{file}: tensor {name!r}")
                    loaded.add(target)
    check_complete(model, params, loaded, model_dir, files)


def open_safetensors(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        raise OSError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def load_tensor(model: nn.Module, params: dict, target: tuple[str, object], tensor, where: str) -> None:
    """Check the whole checkpoint tensor against the parameter (piece) it is for, then load this rank's slice."""
    pname, shard = target
    if pname not in params:
        raise ValueError(f"{where} has no place in {type(model).__name__} (no parameter {pname!r})")
    param = params[pname]
    pieces = getattr(param, "shard_ids", (None,))
    if shard not in pieces:
        wanted = "one whole tensor" if pieces == (None,) else f"the separate pieces {list(pieces)}"
        raise ValueError(f"{where} does not fit {pname!r}, which loads from {wanted}")
    found, expected = shape_of(tensor), checkpoint_shape(param, shard)
    if found != expected:
        raise ValueError(f"{where} has shape {found}; the model, as config.json describes it, expects {expected}")
    loader = getattr(param, "weight_loader", default_weight_loader)
    loader(param, tensor, shard) if shard is not None else loader(param, tensor)


def check_complete(model: nn.Module, params: dict, loaded: set, model_dir, files: list[Path]) -> None:
    """Every piece of every parameter came from the checkpoint (else it would be uninitialised memory)."""
    missing = [model.param_to_checkpoint_name(pname, shard) for pname, param in params.items()
               for shard in getattr(param, "shard_ids", (None,)) if (pname, shard) not in loaded]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"the checkpoint in {model_dir} ({', '.join(f.name for f in files)}) is missing "
                         f"tensors the model needs: {', '.join(missing[:8])}{more}")
