"""Runs the model for one scheduled batch: batch -> tensors -> forward -> logits -> sampled tokens.

It builds the model with the kernels ``nanovllm/kernels.py`` selects, owns the KV cache (one
[2, layers, blocks, block_size, kv_heads, head_dim] tensor, each layer given its slice) and, on CUDA, the
captured CUDA graphs of decode steps and short prefills (``cuda_graphs.py``).  With ``kv_cache_dtype="fp8"``
the cache holds e4m3 bytes, and a calibration pass sets each layer's scales first (``attention/fp8.py``).
``forward`` (a graph's replay, or ``prepare`` + the model) + the LM head + ``sampler`` is the whole path of a
step; overlapped execution (``overlap.py``) launches the same pieces without waiting.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from nanovllm.attention import fp8
from nanovllm.attention.base import AttentionMetadata
from nanovllm.config import EngineConfig
from nanovllm.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from nanovllm.engine.sequence import ScheduledBatch, Sequence
from nanovllm.kernels import select_kernels
from nanovllm.layers.attention import PagedAttention
from nanovllm.layers.sampler import Sampler, record_prompt_logprobs
from nanovllm.loading.resolve import ResolvedModel
from nanovllm.loading.weights import load_weights
from nanovllm.utils import cdiv

CPU_KV_CACHE_CAP = 1 << 30  # bytes: on a CPU the cache takes at most this, or a quarter of free memory


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Small random weights (norms at one): for benchmarks, where speed does not depend on the values."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=gen)


def available_host_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def kv_blocks_usable(config: EngineConfig, block_size: int) -> int:
    """The most KV blocks the configuration can ever fill: ``max_num_seqs`` sequences of ``max_model_len``
    tokens each (so never fewer than one full sequence needs).  More would be memory no request can use."""
    return config.max_num_seqs * cdiv(config.max_model_len, block_size)


def kv_cache_blocks(budget: int, bytes_per_block: int, config: EngineConfig, block_size: int) -> int:
    """How many KV blocks to allocate when ``num_kvcache_blocks`` is not given: as many as ``budget`` bytes
    hold, but no more than the configuration can use (``kv_blocks_usable``).  An engine configured for a few
    short sequences then takes a few megabytes, not most of the GPU, and several fit on one card."""
    return max(0, min(budget // bytes_per_block, kv_blocks_usable(config, block_size)))


def cpu_kv_budget(available: int) -> int:
    """Bytes the KV cache may take on a CPU: a quarter of the free host memory, at most ``CPU_KV_CACHE_CAP``
    (the host also holds the weights, the activations and everything else the user runs)."""
    return min(CPU_KV_CACHE_CAP, available // 4)


def gpu_kv_budget(total: int, free: int, reserved: int, peak: int, utilization: float) -> int:
    """Bytes the KV cache may take on a GPU of ``total`` bytes with ``free`` bytes free, where this process's
    allocator holds ``reserved`` bytes and peaked at ``peak`` bytes allocated (the weights plus the largest
    prefill's activations): the engine's share (``utilization`` of the card), less what other processes use
    and less that peak."""
    used_by_others = total - free - reserved
    return int(total * utilization - used_by_others - peak)


def sampling_rows(batch: ScheduledBatch) -> list[int]:
    """The rows of a step's tokens whose logits are needed: each sampling sequence's last new token."""
    ends = np.cumsum(batch.num_new_tokens) - 1
    return [int(ends[i]) for i in range(len(batch.seqs)) if batch.samples(i)]


class ModelRunner:
    def __init__(self, config: EngineConfig, model: ResolvedModel, extra_kv_bytes_per_block: int = 0):
        """``extra_kv_bytes_per_block``: what another cache of as many blocks takes per block (a draft model's,
        ``spec_decode.py``): a cache sized from free memory leaves room for it."""
        self.config, self.hf_config = config, model.hf_config
        self.extra_kv_bytes_per_block = extra_kv_bytes_per_block
        self.device, self.dtype = model.device, model.dtype
        cls = model.model_class
        self.kernels = select_kernels(config.attention_backend, self.device, self.dtype, config.enforce_eager,
                                      cls.fusions(self.hf_config))
        self.backend = self.kernels.attention
        self.block_size = config.kvcache_block_size
        if self.backend.block_size(self.block_size) != self.block_size:
            raise ValueError(f"kvcache_block_size={self.block_size} does not suit the {self.backend.name} backend "
                             f"(it needs multiples of {self.backend.block_size_multiple})")
        with torch.device(self.device), default_dtype(self.dtype):
            self.model = cls(self.hf_config, self.kernels)
        if config.load_format == "dummy":
            init_random_weights(self.model, config.seed)
        else:
            load_weights(self.model, model.folder)
        self.model.eval()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.sampler = Sampler(self.device, config.seed)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.kv_dtype = fp8.kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        if self.kv_dtype == fp8.FP8_DTYPE:
            self.calibrate_kv_scales()
        self.num_kvcache_blocks = self.allocate_kv_cache()
        if self.device.type == "cuda":
            self.warmup_prefill()
            if not config.enforce_eager and self.backend.cuda_graph_safe:
                self.capture_graphs()
            self.sampler.warmup(self.hf_config.vocab_size, self.dtype)

    def capture_graphs(self) -> None:
        """Capture the short prefills (when the backend allows) and the decode steps, in one memory pool."""
        config, hidden = self.config, self.hf_config.hidden_size
        pool = None
        if self.backend.prefill_graph_safe:
            self.prefill_graphs = PrefillGraphs(self.model, config.max_num_batched_tokens, config.max_num_seqs,
                                                config.max_model_len, self.block_size, hidden, self.dtype, self.device)
            pool = self.prefill_graphs.capture()
        # a decode step holds at most this many sequences (one token each): no larger graph is captured
        max_decode = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.graphs = DecodeGraphs(self.model, max_decode, config.max_model_len, self.block_size, hidden,
                                   self.dtype, self.device)
        self.graphs.capture(pool)

    @property
    def supports_overlap(self) -> bool:
        """Overlapped execution needs the decode graphs (an eager step's host work would not overlap)."""
        return self.graphs is not None

    def close(self) -> None:
        """Release the memory (graphs, KV cache, weights) now, even if something still holds this runner
        (idempotent).  Nothing else in the engine holds the weights (a parameter reaches its layer's loader
        through a weak reference, see ``layers/linear.py``), so dropping them here frees them at once; on a
        GPU the allocator's cache then goes back to the driver, so that other processes (and ``nvidia-smi``)
        see it free."""
        if getattr(self, "model", None) is None:  # closed already, or __init__ failed before the model
            return
        self.graphs = self.prefill_graphs = None
        for layer in getattr(self, "attn_layers", []):
            layer.k_cache = layer.v_cache = torch.tensor([])
        self.kv_cache = None
        self.model = None
        self.attn_layers = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __del__(self):
        # a dropped engine frees its memory at once, and on a GPU gives it back to the driver (``close``)
        try:
            self.close()
        except Exception:  # at interpreter exit torch may already be half torn down: nothing left to free
            pass

    # -- KV cache ------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layer = self.attn_layers[0]
        return (2 * len(self.attn_layers) * self.block_size * layer.num_kv_heads * layer.head_dim
                * self.kv_dtype.itemsize)

    @torch.inference_mode()
    def calibrate_kv_scales(self) -> None:
        """Set every layer's FP8 scales from one forward pass, without a cache, in the model's dtype, over
        fixed pseudo-random tokens (``fp8.calibration_token_ids``): each KV head's largest |K| and |V|, with
        ``fp8.SCALE_HEADROOM``.  Every tensor-parallel rank runs it at the same point, for its own heads."""
        n = min(fp8.CALIBRATION_TOKENS, self.config.max_model_len, self.config.max_num_batched_tokens)
        seq = Sequence(-1, fp8.calibration_token_ids(self.hf_config.vocab_size, n))
        for layer in self.attn_layers:
            layer.kv_amax = []
        try:
            self.forward(ScheduledBatch([seq], [n], is_prefill=True), warmup=True)
            for layer in self.attn_layers:
                k_amax, v_amax = (torch.stack(a).amax(0) for a in zip(*layer.kv_amax))
                layer.k_scale, layer.v_scale = fp8.fp8_scale(k_amax), fp8.fp8_scale(v_amax)
        finally:
            for layer in self.attn_layers:
                layer.kv_amax = None

    def allocate_kv_cache(self) -> int:
        per_block = self.kv_bytes_per_block()
        if self.config.num_kvcache_blocks is not None:
            num_blocks = self.config.num_kvcache_blocks
        else:
            budget = self._gpu_kv_budget() if self.device.type == "cuda" else cpu_kv_budget(available_host_memory())
            num_blocks = kv_cache_blocks(budget, per_block + self.extra_kv_bytes_per_block, self.config,
                                         self.block_size)
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache ({per_block} bytes per block); lower "
                               "max_num_batched_tokens or raise gpu_memory_utilization")
        layer = self.attn_layers[0]
        self.kv_cache = torch.zeros(2, len(self.attn_layers), num_blocks, self.block_size, layer.num_kv_heads,
                                    layer.head_dim, dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return num_blocks

    def _gpu_kv_budget(self) -> int:
        """Run the largest prefill once, then measure what is left of the allowed share of the GPU."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.max_num_batched_tokens, self.config.max_model_len * self.config.max_num_seqs)
        seqs, lengths = [], []
        while n > 0:  # warm-up prompts of at most max_model_len tokens, no KV cache yet
            lengths.append(min(n, self.config.max_model_len))
            n -= lengths[-1]
        for i, length in enumerate(lengths):
            seqs.append(Sequence(-1 - i, [0] * length))
        self.run(ScheduledBatch(seqs, lengths, is_prefill=True), warmup=True)
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return gpu_kv_budget(total, free, torch.cuda.memory_reserved(self.device),
                             torch.cuda.max_memory_allocated(self.device), self.config.gpu_memory_utilization)

    # -- one step ------------------------------------------------------------------------------------
    def to_device(self, array, dtype) -> torch.Tensor:
        """A host array on the runner's device (through pinned memory, without waiting, on a GPU)."""
        t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch, warmup: bool = False):
        """Tensors for the forward pass, and the rows whose logits are needed (sequences that sample).
        ``warmup``: sequences without blocks (the memory-sizing forward pass), so no slots."""
        block_size = self.block_size
        ids, positions, slots, query_lens, context_lens, logits_rows = [], [], [], [], [], []
        offset = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(batch.new_token_ids(i))
            pos = np.arange(start, end)
            positions.append(pos)
            if not warmup:
                table = np.asarray(seq.block_table)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            query_lens.append(n)
            context_lens.append(end)
            offset += n
            if batch.samples(i):
                logits_rows.append(offset - 1)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = np.full((len(batch.seqs), max(max_blocks, 1)), -1, dtype=np.int32)
        for i, seq in enumerate(batch.seqs):
            tables[i, :len(seq.block_table)] = seq.block_table
        cu_q = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=cu_q[1:])
        cu_k = np.zeros(len(context_lens) + 1, dtype=np.int32)
        np.cumsum(context_lens, out=cu_k[1:])
        meta = AttentionMetadata(
            is_prefill=batch.is_prefill,
            cu_seqlens_q=self.to_device(cu_q, torch.int32),
            context_lens=self.to_device(np.asarray(context_lens), torch.int32),
            slot_mapping=self.to_device(np.concatenate(slots) if slots else np.zeros(0), torch.int64),
            block_tables=self.to_device(tables, torch.int32),
            max_seqlen_q=max(query_lens), max_seqlen_k=max(context_lens),
            has_prefix=any(c != q for c, q in zip(context_lens, query_lens)),
            cu_seqlens_k=self.to_device(cu_k, torch.int32),
            query_lens_cpu=query_lens, context_lens_cpu=context_lens,
        )
        input_ids = self.to_device(np.asarray(ids), torch.int64)
        return input_ids, self.to_device(np.concatenate(positions), torch.int64), meta, logits_rows

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, warmup: bool = False):
        """The forward pass of a step: (hidden states, the rows of the tokens that sample).  A captured graph
        when one fits (decode, or a short prefill), else the eager path (``prepare`` + the model)."""
        if batch.is_prefill:
            graphs = self.prefill_graphs
            if graphs is not None and not warmup and graphs.fits(len(batch.seqs), sum(batch.num_new_tokens)):
                return graphs.run(batch), sampling_rows(batch)
        elif self.graphs is not None and len(batch.seqs) <= self.graphs.max_batch:
            return self.graphs.replay(batch.seqs), slice(None)
        input_ids, positions, meta, rows = self.prepare(batch, warmup)
        return self.model(input_ids, positions, meta), rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, warmup: bool = False) -> list[int]:
        """Compute the batch; return one sampled token per sequence that finished its tokens this step."""
        hidden, rows = self.forward(batch, warmup)
        if batch.is_prefill and not warmup:
            record_prompt_logprobs(self.model.compute_logits, hidden, batch)
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[rows])
        sampling_seqs = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        return self.sampler(logits, sampling_seqs).tolist()

    @torch.inference_mode()
    def logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits of the last token of each sequence that samples (for tests and the book)."""
        input_ids, positions, meta, rows = self.prepare(batch)
        return self.model.compute_logits(self.model(input_ids, positions, meta)[rows]).float()

    def warmup_prefill(self) -> None:
        """Run the largest prefill once through the paged path (a prefix, then the rest), so that kernels
        compile now rather than during the first requests.  It writes junk into free blocks only."""
        block_size = self.block_size
        n = min(self.config.max_num_batched_tokens, self.num_kvcache_blocks * block_size,
                self.config.max_model_len - 1)
        if n < 2:
            return
        seq = Sequence(-1, [0] * n)
        seq.block_table = list(range(cdiv(n, block_size)))
        first = n // 2
        self.run(ScheduledBatch([seq], [first], is_prefill=True))  # no prefix: nothing sampled
        seq.num_computed_tokens = first
        self.run(ScheduledBatch([seq], [n - first], is_prefill=True))  # over a cached prefix
        # the LM head and the sampler for as many rows as a prefill step can sample: the memory they take
        # is then in the allocator's cache, not asked of the driver in the middle of a run
        rows = min(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        hidden = torch.zeros(rows, self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        self.sampler(self.model.compute_logits(hidden), [Sequence(-2 - i, [0]) for i in range(rows)])
        torch.cuda.synchronize(self.device)
