"""Model registry: HF ``architectures`` names -> our classes."""

from nanovllm.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(hf_config):
    archs = getattr(hf_config, "architectures", None) or []
    if isinstance(archs, str):  # list("Qwen3ForCausalLM") would be its letters
        raise ValueError(f"'architectures' must be a list of names, found the string {archs!r}: write [{archs!r}]")
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported architecture {archs or getattr(hf_config, 'model_type', None)!r}; "
                     f"supported: {sorted(MODEL_REGISTRY)}")
