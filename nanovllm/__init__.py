"""nanovllm: a small, complete, fast LLM inference engine, built step by step in the book's chapters.

``LLM`` and ``SamplingParams`` are imported lazily, so that importing a submodule (say the block manager
in a notebook) never pulls in CUDA, Triton or flash-attn.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name):
    if name == "LLM":
        from nanovllm.llm import LLM
        return LLM
    if name == "SamplingParams":
        from nanovllm.sampling_params import SamplingParams
        return SamplingParams
    if name == "RequestOutput":
        from nanovllm.outputs import RequestOutput
        return RequestOutput
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
