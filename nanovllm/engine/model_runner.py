"""Runs the model for one scheduled batch: batch -> tensors -> forward -> logits -> sampled tokens.

It also owns the KV cache (one [2, layers, blocks, block_size, kv_heads, head_dim] tensor, each layer given
its slice) and, on CUDA, the captured decode graphs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from pathlib import Path

import numpy as np
import torch

from nanovllm.attention.base import AttentionMetadata
from nanovllm.config import EngineConfig
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import PagedAttention
from nanovllm.layers.sampler import sample
from nanovllm.loading.weights import load_weights
from nanovllm.models import model_class

CPU_KV_CACHE_CAP = 1 << 30  # bytes: on a CPU the cache takes at most this, or a quarter of free memory


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_backend(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """The attention backend: ``name`` as asked, or for "auto" the fastest that runs here."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            from nanovllm.attention.flash_attn import flash_attn_usable

            try:
                from nanovllm.attention import triton_kernels  # noqa: F401

                name = "triton"
            except ImportError:
                pass
            half = dtype in (torch.float16, torch.bfloat16)  # flash-attn has no float32 kernels
            if half and flash_attn_usable(device) and name == "triton":  # it stores K/V with our Triton kernel
                name = "flash_attn"
    if name == "torch":
        from nanovllm.attention.torch_ref import TorchRefBackend

        return TorchRefBackend()
    if name == "triton":
        from nanovllm.attention.triton_kernels import TritonBackend

        return TritonBackend()
    if name == "flash_attn":
        from nanovllm.attention.flash_attn import FlashAttnBackend

        return FlashAttnBackend()
    raise ValueError(f"unknown attention_backend {name!r}")


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int) -> None:
    """Small random weights (norms at one): for benchmarks, where speed does not depend on the values."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=gen)


def row_seed(seed: int, step: int) -> int:
    """A Philox seed for one row of one step, mixed from a request seed and its token count (< 2**53, so
    it survives the float64 staging buffer exactly)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**53 - 1)


def available_host_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def fill_decode_inputs(seqs: list[Sequence], block_size: int, ints: np.ndarray, ctx: np.ndarray,
                       tables: np.ndarray) -> None:
    """The host side of a decode step, in a few numpy calls for the whole batch (no per-sequence loop):
    ``ints`` [>=3, b] gets each sequence's last token, its position and the cache slot it stores into,
    ``ctx`` [b] its context length, ``tables`` [b, width] its block table.  Rows past ``len(seqs)`` are
    padding: token 0 at position 0, slot -1 (store nothing), context 1 over block 0 (the buffers are
    reused, so every padding field is written).  Entries of ``tables`` past a sequence's
    blocks are left as they were (the kernels never read them)."""
    n, b = len(seqs), ctx.shape[0]
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=n)
    num_blocks = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=n)
    flat = np.fromiter(itertools.chain.from_iterable(s.block_table for s in seqs), dtype=np.int32,
                       count=int(num_blocks.sum()))
    starts = np.cumsum(num_blocks) - num_blocks
    tables[np.repeat(np.arange(n), num_blocks), np.arange(flat.size) - np.repeat(starts, num_blocks)] = flat
    last = lengths - 1
    ints[0, :n] = np.fromiter((s.token_ids[-1] for s in seqs), dtype=np.int64, count=n)
    ints[1, :n] = last
    ints[2, :n] = flat[starts + last // block_size].astype(np.int64) * block_size + last % block_size
    ctx[:n] = lengths
    ints[:2, n:b], ints[2, n:b], ctx[n:b], tables[n:b, 0] = 0, -1, 1, 0


class PinnedRing:
    """A few sets of pinned host buffers, handed out in turn.  Allocating pinned memory every step costs the
    host ~0.5 ms; a set comes round again only after the copies recorded on its event have run (with a few
    sets and at most two steps in flight, long since)."""

    def __init__(self, slots: int, *specs: tuple[int, torch.dtype]):
        self.sets = [([torch.zeros(n, dtype=dtype, pin_memory=True) for n, dtype in specs], torch.cuda.Event())
                     for _ in range(slots)]
        self.index = 0

    def next(self) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        buffers, event = self.sets[self.index % len(self.sets)]
        self.index += 1
        event.synchronize()  # an event never recorded returns at once
        return buffers, event


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, model_dir: Path, device: torch.device,
                 dtype: torch.dtype):
        self.config, self.hf_config, self.device, self.dtype = config, hf_config, device, dtype
        self.backend = make_backend(config.attention_backend, device, dtype)
        multiple = self.backend.block_size_multiple
        if config.kvcache_block_size % multiple:  # the block size follows the backend
            config.kvcache_block_size = max(multiple, config.kvcache_block_size // multiple * multiple)
        self.block_size = config.kvcache_block_size
        with torch.device(device), default_dtype(dtype):
            self.model = model_class(hf_config)(hf_config)
        if config.load_format == "dummy":
            init_random_weights(self.model, config.seed)
        else:
            load_weights(self.model, model_dir)
        self.model.eval()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for layer in self.attn_layers:
            layer.backend = self.backend
        self.use_fused_rope_store()
        self.use_fused_mlp()
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.rng = random.Random(config.seed)  # per-step seeds of the fused sampler
        self.gumbel_sample = None
        if device.type == "cuda":
            try:
                from nanovllm.layers.triton_sampler import gumbel_sample

                self.gumbel_sample = gumbel_sample
            except ImportError:
                pass
        self.num_kvcache_blocks = self.allocate_kv_cache()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prev_seq_rows: dict[int, int] = {}
        if device.type == "cuda" and not config.enforce_eager:
            self.compile_layers()
        if device.type == "cuda":
            self.warmup_prefill()
        if device.type == "cuda" and not config.enforce_eager and self.backend.cuda_graph_safe:
            self.capture_decode_graphs()
        if self.gumbel_sample is not None:
            self.warmup_sampler()

    def use_fused_rope_store(self) -> None:
        """Backends that store K/V with Triton get qk-norm + RoPE + KV store as one kernel per layer (the
        torch backend keeps the step-by-step reference path)."""
        if not self.backend.fuses_rope_store(self.device):
            return
        from nanovllm.attention.triton_kernels import qkv_rope_store
        from nanovllm.models.llama import DecoderAttention

        for m in self.model.modules():
            if isinstance(m, DecoderAttention):
                m.fused_rope_store = qkv_rope_store

    def use_fused_mlp(self) -> None:
        """On CUDA, decode-sized batches compute the MLP's gate-up projection and its SiLU-and-mul in one
        Triton kernel (``layers/triton_gemm.py``) instead of a cuBLAS GEMM and an activation kernel."""
        if self.device.type != "cuda":
            return
        try:
            from nanovllm.layers.triton_gemm import skinny_gemm
        except ImportError:
            return
        from nanovllm.models.llama import MLP

        for m in self.model.modules():
            if isinstance(m, MLP):
                m.fused_gate_up_act = skinny_gemm

    def close(self) -> None:
        """Release the GPU memory (graphs, KV cache, weights) even if something still holds this runner."""
        self.graphs.clear()
        for layer in self.attn_layers:
            layer.k_cache = layer.v_cache = torch.tensor([])
        self.kv_cache = None
        self.model = None
        self.attn_layers = []
        for name in ("g_ints", "g_ctx", "g_tables", "g_cu_q", "g_hidden", "input_ring", "token_ring"):
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- KV cache ------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layer = self.attn_layers[0]
        return (2 * len(self.attn_layers) * self.block_size * layer.num_kv_heads * layer.head_dim
                * self.dtype.itemsize)

    def allocate_kv_cache(self) -> int:
        per_block = self.kv_bytes_per_block()
        needed = self.config.max_num_seqs * -(-self.config.max_model_len // self.block_size)
        if self.config.num_kvcache_blocks is not None:
            num_blocks = self.config.num_kvcache_blocks
        elif self.device.type == "cuda":
            num_blocks = self._blocks_from_gpu_memory(per_block)
        else:
            budget = min(CPU_KV_CACHE_CAP, available_host_memory() // 4)
            num_blocks = min(budget // per_block, needed)
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache ({per_block} bytes per block); lower "
                               "max_num_batched_tokens or raise gpu_memory_utilization")
        layer = self.attn_layers[0]
        self.kv_cache = torch.zeros(2, len(self.attn_layers), num_blocks, self.block_size, layer.num_kv_heads,
                                    layer.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return num_blocks

    def _blocks_from_gpu_memory(self, per_block: int) -> int:
        """Run the largest prefill once, then give the cache what is left of the allowed share."""
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
        peak = torch.cuda.max_memory_allocated(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - used_by_others - peak
        return int(budget // per_block)

    # -- one step ------------------------------------------------------------------------------------
    def _to_device(self, array, dtype) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch, warmup: bool = False):
        """Tensors for the forward pass, and the rows whose logits are needed (sequences that sample)."""
        bs = self.block_size
        ids, pos, slots, q_lens, ctx_lens, logits_rows = [], [], [], [], [], []
        offset = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[start:end])
            p = np.arange(start, end)
            pos.append(p)
            if not warmup:
                table = np.asarray(seq.block_table)
                slots.append(table[p // bs] * bs + p % bs)
            q_lens.append(n)
            ctx_lens.append(end)
            offset += n
            if batch.samples(i):
                logits_rows.append(offset - 1)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = np.full((len(batch.seqs), max(max_blocks, 1)), -1, dtype=np.int32)
        for i, seq in enumerate(batch.seqs):
            tables[i, :len(seq.block_table)] = seq.block_table
        cu_q = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu_q[1:])
        cu_k = np.zeros(len(ctx_lens) + 1, dtype=np.int32)
        np.cumsum(ctx_lens, out=cu_k[1:])
        meta = AttentionMetadata(
            is_prefill=batch.is_prefill,
            cu_seqlens_q=self._to_device(cu_q, torch.int32),
            context_lens=self._to_device(np.asarray(ctx_lens), torch.int32),
            slot_mapping=self._to_device(np.concatenate(slots) if slots else np.zeros(0), torch.int64),
            block_tables=self._to_device(tables, torch.int32),
            max_seqlen_q=max(q_lens), max_seqlen_k=max(ctx_lens),
            has_prefix=any(c != q for c, q in zip(ctx_lens, q_lens)),
            cu_seqlens_k=self._to_device(cu_k, torch.int32),
            query_lens_cpu=q_lens, context_lens_cpu=ctx_lens,
        )
        input_ids = self._to_device(np.asarray(ids), torch.int64)
        positions = self._to_device(np.concatenate(pos), torch.int64)
        return input_ids, positions, meta, logits_rows

    def sampling_tensors(self, seqs: list[Sequence]):
        params = [s.params for s in seqs]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_k = top_p = None
        if any(p.top_k > 0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64).to(self.device)
        if any(p.top_p < 1 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32).to(self.device)
        generators = [s.generator for s in seqs] if any(s.generator is not None for s in seqs) else None
        return temps.to(self.device), top_k, top_p, generators

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, warmup: bool = False) -> list[int]:
        """Compute the batch; return one sampled token per sequence that finished its tokens this step."""
        if not batch.is_prefill and len(batch.seqs) <= self.max_graph_batch:
            hidden, rows = self.replay_decode_graph(batch.seqs), slice(None)
        else:
            input_ids, positions, meta, rows = self.prepare(batch, warmup)
            hidden = self.model(input_ids, positions, meta)
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[rows])
        sampling_seqs = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        return self.sample(logits, sampling_seqs).tolist()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], host: torch.Tensor | None = None) -> torch.Tensor:
        """Next tokens for ``seqs`` (one row of logits each).  On CUDA, batches without top-k/top-p take
        the fused Gumbel-max kernel; everything else takes the PyTorch sampler.  ``host``: a pinned
        [2, len(seqs)] float64 staging buffer to use (else one is allocated)."""
        params = [s.params for s in seqs]
        if self.gumbel_sample is not None and not any(p.top_k > 0 or p.top_p < 1 for p in params):
            base = self.rng.getrandbits(62)
            if host is None:
                host = torch.empty(2, len(seqs), dtype=torch.float64, pin_memory=True)
            host[0] = torch.tensor([p.temperature for p in params], dtype=torch.float64)
            host[1] = torch.tensor([row_seed(p.seed, s.num_completion_tokens) if p.seed is not None
                                    else row_seed(base, i) for i, (s, p) in enumerate(zip(seqs, params))],
                                   dtype=torch.float64)
            dev = host.to(self.device, non_blocking=True)
            return self.gumbel_sample(logits, dev[0], dev[1])  # the kernel reads float64 itself
        temps, top_k, top_p, generators = self.sampling_tensors(seqs)
        return sample(logits, temps, top_k, top_p, generators, self.generator)

    def warmup_prefill(self) -> None:
        """Run the largest prefill once through the paged path (a prefix, then the rest), so that kernels
        compile now rather than during the first requests.  It writes junk into free blocks only."""
        bs = self.block_size
        n = min(self.config.max_num_batched_tokens, self.num_kvcache_blocks * bs, self.config.max_model_len - 1)
        if n < 2:
            return
        seq = Sequence(-1, [0] * n)
        seq.block_table = list(range(-(-n // bs)))
        first = n // 2
        self.run(ScheduledBatch([seq], [first], is_prefill=True))  # no prefix: nothing sampled
        seq.num_computed_tokens = first
        self.run(ScheduledBatch([seq], [n - first], is_prefill=True))  # over a cached prefix
        # the LM head and the sampler for as many rows as a prefill step can sample: the memory they take
        # is then in the allocator's cache, not asked of the driver in the middle of a run
        rows = min(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        hidden = torch.zeros(rows, self.hf_config.hidden_size, dtype=self.dtype, device=self.device)
        self.sample(self.model.compute_logits(hidden), [Sequence(-2 - i, [0]) for i in range(rows)])
        torch.cuda.synchronize(self.device)

    def warmup_sampler(self) -> None:
        """Compile both versions of the sampling kernel (whole rows, rows cut in column ranges) now, not in
        the middle of the first requests."""
        from nanovllm.layers.triton_sampler import whole_row_batch

        vocab = self.hf_config.vocab_size
        for rows in (1, whole_row_batch(self.device)):
            logits = torch.zeros(rows, vocab, dtype=self.dtype, device=self.device)
            params = torch.full((2, rows), 0.5, dtype=torch.float64, device=self.device)  # as sample() stages them
            self.gumbel_sample(logits, params[0], params[1])
        torch.cuda.synchronize(self.device)

    # -- torch.compile and CUDA graphs (CUDA only; enforce_eager=True turns both off) ------------------
    def compile_layers(self) -> None:
        """Compile the small elementwise layers (RMSNorm(+residual), RoPE, SiLU-and-mul): each becomes one
        fused kernel instead of several.  One compiled function is shared by every layer of a kind."""
        import torch._dynamo

        from nanovllm.layers.activation import SiluAndMul, silu_and_mul
        from nanovllm.layers.norm import RMSNorm, add_rms_norm, rms_norm
        from nanovllm.layers.rotary import RotaryEmbedding, apply_rotary

        # one compiled entry per (dtype, rank) a layer kind meets; several engines in one process (tests,
        # notebooks) meet more than dynamo's default limit of 8, past which it would silently run eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        norm, add_norm = torch.compile(rms_norm, dynamic=True), torch.compile(add_rms_norm, dynamic=True)
        act, rot = torch.compile(silu_and_mul, dynamic=True), torch.compile(apply_rotary, dynamic=True)
        for m in self.model.modules():
            if isinstance(m, RMSNorm):
                m.fn, m.add_fn = norm, add_norm
            elif isinstance(m, SiluAndMul):
                m.fn = act
            elif isinstance(m, RotaryEmbedding):
                m.fn = rot

    @property
    def max_graph_batch(self) -> int:
        return max(self.graphs) if self.graphs else 0

    def graph_batch_sizes(self) -> list[int]:
        top = min(self.config.max_num_seqs, 512)
        sizes = [b for b in (1, 2, 4, 8) if b < top] + list(range(16, top, 16)) + [top]
        return sorted(set(sizes))

    @torch.inference_mode()
    def capture_decode_graphs(self) -> None:
        """Record one decode step per batch-size bucket as a CUDA graph; replaying it launches the whole
        forward pass at once.  Buffers are static: each step copies its inputs into them.  The graphs share
        one memory pool (captured largest first), and every shape runs once before its capture."""
        top = self.graph_batch_sizes()[-1]
        width = -(-self.config.max_model_len // self.block_size)
        dev = self.device
        hidden_size = self.hf_config.hidden_size
        self.g_ints = torch.zeros(4, top, dtype=torch.int64, device=dev)  # ids, positions, slots, prev rows
        self.g_ctx = torch.ones(top, dtype=torch.int32, device=dev)
        self.g_tables = torch.zeros(top, width, dtype=torch.int32, device=dev)
        self.g_cu_q = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.g_hidden = torch.zeros(top, hidden_size, dtype=self.dtype, device=dev)
        self.prev_tokens, self.prev_seq_rows = torch.zeros(1, dtype=torch.int64, device=dev), {}
        self.g_ints[2].fill_(-1)
        # pinned staging for each step's inputs, and for the sampler's parameters and the sampled tokens
        self.input_ring = PinnedRing(4, (4 * top, torch.int64), (top, torch.int32), (top * width, torch.int32))
        self.token_ring = PinnedRing(4, (2 * top, torch.float64), (top, torch.int64))
        pool = None
        for b in reversed(self.graph_batch_sizes()):
            meta = self._graph_meta(b)
            ids, pos = self.g_ints[0, :b], self.g_ints[1, :b]
            self.g_hidden[:b] = self.model(ids, pos, meta)  # warm this shape (and compile it)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.g_hidden[:b] = self.model(ids, pos, meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(dev)

    def _graph_meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False, cu_seqlens_q=self.g_cu_q[:b + 1], context_lens=self.g_ctx[:b],
            slot_mapping=self.g_ints[2, :b], block_tables=self.g_tables[:b], max_seqlen_q=1,
            max_seqlen_k=self.config.max_model_len)

    def replay_decode_graph(self, seqs: list[Sequence], prev_rows: np.ndarray | None = None) -> torch.Tensor:
        """Copy this step's inputs into the static buffers, replay the smallest graph that fits.

        ``prev_rows[i] >= 0``: sequence i's input token is row ``prev_rows[i]`` of the previous step's
        sampled tokens, still on the GPU (overlapped decode)."""
        n, bs = len(seqs), self.block_size
        b = next(size for size in sorted(self.graphs) if size >= n)
        (h_ints, h_ctx, h_tables), event = self.input_ring.next()
        h_ints, h_ctx = h_ints[:4 * b].view(4, b), h_ctx[:b]
        h_tables = h_tables[:b * self.g_tables.shape[1]].view(b, -1)
        ints, ctx, tables = h_ints.numpy(), h_ctx.numpy(), h_tables.numpy()
        fill_decode_inputs(seqs, bs, ints, ctx, tables)
        if prev_rows is not None:
            ints[3, :n] = prev_rows
            ints[3, n:b] = -1
            self.g_ints[:, :b].copy_(h_ints, non_blocking=True)
            rows = self.g_ints[3, :b]
            from_prev = self.prev_tokens[rows.clamp(0, self.prev_tokens.numel() - 1)]
            self.g_ints[0, :b] = torch.where(rows >= 0, from_prev, self.g_ints[0, :b])
        else:
            self.g_ints[:3, :b].copy_(h_ints[:3], non_blocking=True)
        self.g_ctx[:b].copy_(h_ctx, non_blocking=True)
        self.g_tables[:b].copy_(h_tables, non_blocking=True)
        event.record()
        self.graphs[b].replay()
        return self.g_hidden[:n]

    @property
    def supports_overlap(self) -> bool:
        return bool(self.graphs)

    @torch.inference_mode()
    def launch_decode(self, seqs: list[Sequence]):
        """Launch a decode step without waiting for it (overlapped decode).  A sequence whose last token is
        a placeholder gets the token the previous launch sampled for it.  Returns a ticket for tokens()."""
        last = self.prev_seq_rows
        rows = np.fromiter((last.get(s.seq_id, -1) if s.token_ids[-1] < 0 else -1 for s in seqs),
                           dtype=np.int64, count=len(seqs))
        hidden = self.replay_decode_graph(seqs, rows if last else None)
        n = len(seqs)
        (params_buf, tokens_buf), event = self.token_ring.next()
        sampled = self.sample(self.model.compute_logits(hidden), seqs, params_buf[:2 * n].view(2, n))
        return self._hand_over(sampled, seqs, tokens_buf[:n], event)

    def _hand_over(self, sampled: torch.Tensor, seqs: list[Sequence], host: torch.Tensor, event):
        """A launch's sampled tokens: kept on the GPU for the next launch's placeholders, and copied to the
        pinned ``host`` buffer behind ``event``.  Returns the ticket for tokens()."""
        self.prev_tokens = sampled
        self.prev_seq_rows = {s.seq_id: i for i, s in enumerate(seqs)}
        host.copy_(sampled, non_blocking=True)
        event.record()
        return host, event

    @torch.inference_mode()
    def launch_prefill(self, batch: ScheduledBatch):
        """Launch a prefill step without waiting for it (overlapped steps): the forward pass, then one token
        sampled for each sequence that finishes its prompt, left on the GPU for the next launch (as
        ``launch_decode`` leaves its tokens).  Returns a ticket for tokens()."""
        input_ids, positions, meta, rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta)
        seqs = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        if not seqs:
            self.prev_seq_rows = {}
            return None
        index = self._to_device(np.asarray(rows, dtype=np.int64), torch.int64)  # no pageable copy: no sync
        sampled = self.sample(self.model.compute_logits(hidden.index_select(0, index)), seqs)
        host = torch.empty(len(seqs), dtype=torch.int64, pin_memory=True)
        return self._hand_over(sampled, seqs, host, torch.cuda.Event())

    @staticmethod
    def tokens(ticket) -> list[int]:
        if ticket is None:  # a launch that sampled nothing
            return []
        host, event = ticket
        event.synchronize()
        return host.tolist()

    @torch.inference_mode()
    def logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits of the last token of each sequence that samples (for tests and the book)."""
        input_ids, positions, meta, rows = self.prepare(batch)
        return self.model.compute_logits(self.model(input_ids, positions, meta)[rows]).float()
