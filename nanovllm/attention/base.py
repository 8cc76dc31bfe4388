"""The attention backend interface and the per-step metadata every backend reads.

KV cache layout (one pair of tensors per layer, shared by every backend):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

The cache holds the model's dtype, or with ``kv_cache_dtype="fp8"`` e4m3 bytes with a float32 scale per KV
head for K and for V (``k_scale``, ``v_scale``: [Hkv]; see ``fp8.py``), which every backend method takes
(None for a cache in the model's dtype).

A token's *slot* is ``block_id * block_size + offset``; ``slot_mapping[i]`` is the slot where the
i-th new token of the step stores its K/V (``-1``: store nothing).  A sequence's *block table* lists
its block ids in order; ``block_tables`` pads the rows with ``-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """What one forward step tells the attention layers about the batch.

    The step computes ``cu_seqlens_q[i+1] - cu_seqlens_q[i]`` new tokens for sequence ``i``; those are its
    last tokens, so sequence ``i`` attends over ``context_lens[i]`` tokens in all (cached prefix + new).
    """

    is_prefill: bool  # False: every sequence computes exactly one token (a decode step)
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, offsets of each sequence's new tokens
    context_lens: torch.Tensor  # [B] int32, tokens each sequence attends over (prefix + new)
    slot_mapping: torch.Tensor  # [N] int64, cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, -1 padded
    max_seqlen_q: int
    max_seqlen_k: int
    has_prefix: bool = True  # False: no sequence has cached tokens (a pure varlen prefill)
    cu_seqlens_k: torch.Tensor | None = None  # [B + 1] int32, offsets of context_lens (prefill only)
    # host copies, so backends can loop without device syncs
    query_lens_cpu: list[int] | None = None
    context_lens_cpu: list[int] | None = None


class AttentionBackend:
    """One way to compute paged attention.  Subclasses override the two methods below.

    ``q``: [N, num_heads, head_dim] for the N new tokens of the step; ``k``/``v``: [N, num_kv_heads,
    head_dim], the new tokens' keys and values, already stored in the cache by ``store_kv``.
    Returns [N, num_heads, head_dim].
    """

    name = "base"
    #: block sizes the backend's kernels support: multiples of this
    block_size_multiple: int = 1
    #: whether a decode step can be captured in a CUDA graph (no host syncs, shapes fixed by the caller)
    cuda_graph_safe: bool = False
    #: whether a prefill step can be captured too: no host syncs, the grid fixed by ``max_seqlen_q`` as an
    #: upper bound, and sequences with no new tokens (padding) skipped
    prefill_graph_safe: bool = False
    #: whether the backend reads and writes an FP8 cache (``kv_cache_dtype="fp8"``)
    supports_fp8_kv: bool = False

    @classmethod
    def usable(cls, device, dtype) -> bool:
        """Whether ``attention_backend="auto"`` may pick this backend for ``device`` and ``dtype``."""
        return True

    @classmethod
    def fp8_kv_usable(cls, device) -> bool:
        """Whether the backend can read and write an FP8 cache on ``device``."""
        return cls.supports_fp8_kv

    @classmethod
    def block_size(cls, requested: int) -> int:
        """The KV-cache block size this backend needs, given the one asked for: the nearest multiple of
        ``block_size_multiple`` at most ``requested`` (at least one multiple)."""
        multiple = cls.block_size_multiple
        return requested if requested % multiple == 0 else max(multiple, requested // multiple * multiple)

    def fuses_rope_store(self, device) -> bool:
        """Whether the model may hand this backend K/V already stored by ``triton_kernels.qkv_rope_store``
        (qk-norm, RoPE and the KV store in one kernel) instead of calling ``store_kv``."""
        return False

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        raise NotImplementedError

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, k_scale=None,
                v_scale=None) -> torch.Tensor:
        """``scale``: the softmax scale; ``k_scale``/``v_scale``: an FP8 cache's quantization scales."""
        raise NotImplementedError
