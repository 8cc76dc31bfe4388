"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style) and the two Qwen variants built on it:
Qwen2 adds a bias to the Q/K/V projection, Qwen3 an RMSNorm on each query and key head.

Which kernels run is decided outside, once (``nanovllm/kernels.py``): the model is built with a ``Kernels``
object and each layer keeps what it needs.  These paths replace steps of the reference path when the
engine chose them (``fusions()`` says the model can take them all):

* ``qkv_rope_store``: qk-norm, RoPE and the KV-cache store in one kernel (``DecoderAttention``);
* ``gate_up_silu``: the gate-up GEMM and SiLU-and-mul in one kernel, for decode-sized batches (``MLP``);
* ``splitk_norm``: o and down left as partial sums along K, summed by the RMSNorm after them (on one rank);
* ``qkv_gemm``: the qkv projection in the Triton skinny GEMM, for decode-sized batches.
"""

from __future__ import annotations

import torch
from torch import nn

from nanovllm.attention.base import AttentionMetadata
from nanovllm.distributed import tp_rank_size
from nanovllm.kernels import GATE_UP_SILU, QKV_GEMM, QKV_ROPE_STORE, SPLITK_NORM, Kernels
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import PagedAttention
from nanovllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.rotary import RotaryEmbedding


def rope_settings(cfg) -> tuple[float, dict | None]:
    """rope_theta and scaling from a config of either transformers 4 (rope_theta, rope_scaling) or 5
    (rope_parameters) style."""
    params = getattr(cfg, "rope_parameters", None)
    if params:
        params = dict(params)
        theta = params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return theta, params if params.get("rope_type", "default") != "default" else None
    return getattr(cfg, "rope_theta", 10000.0), getattr(cfg, "rope_scaling", None)


class DecoderAttention(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding, kernels: Kernels):
        super().__init__()
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        num_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, cfg.num_attention_heads, num_kv, qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, kernels.rms_norm) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, kernels.rms_norm) if qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim ** -0.5,
                                   kernels.attention)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_rope_store = kernels.qkv_rope_store  # None: the step-by-step path below

    def forward(self, positions, x, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)
        if self.qkv_rope_store is not None:
            norm = self.q_norm is not None
            q, k, v = self.qkv_rope_store(
                qkv, positions, self.rotary.cos_sin, self.num_heads, self.num_kv_heads, self.head_dim,
                self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                self.q_norm.eps if norm else 0.0, self.attn.k_cache, self.attn.v_cache, meta.slot_mapping,
                self.attn.k_scale, self.attn.v_scale)
            return self.o_proj(self.attn(q, k, v, meta, kv_stored=True).flatten(1))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = self.attn(q, k, v, meta)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg, kernels: Kernels):
        super().__init__()
        if getattr(cfg, "mlp_bias", False):
            raise ValueError("MLP biases are not supported")
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {cfg.hidden_act!r} (supported: silu)")
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)
        self.act = SiluAndMul(kernels.silu_and_mul)
        # None: GEMM, then the activation.  Else one kernel for batches of up to ``fused_max_rows`` rows
        # (decode); larger ones are faster with cuBLAS
        self.gate_up_silu, self.fused_max_rows = kernels.gate_up_silu, kernels.gate_up_silu_max_rows

    def forward(self, x):
        if self.gate_up_silu is not None and x.shape[0] <= self.fused_max_rows:
            return self.down_proj(self.gate_up_silu(x, self.gate_up_proj.weight))
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding, kernels: Kernels):
        super().__init__()
        self.self_attn = DecoderAttention(cfg, qkv_bias, qk_norm, rotary, kernels)
        self.mlp = MLP(cfg, kernels)
        norm = dict(fn=kernels.rms_norm, add_fn=kernels.add_rms_norm, sum_add_fn=kernels.sum_add_rms_norm)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False
    # checkpoint name -> (our parameter, shard): separate projections load into merged matrices
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @classmethod
    def fusions(cls, cfg) -> frozenset[str]:
        """The fused paths this model can take (``nanovllm/kernels.py`` picks among them)."""
        return frozenset({QKV_ROPE_STORE, GATE_UP_SILU, SPLITK_NORM, QKV_GEMM})

    def __init__(self, cfg, kernels: Kernels | None = None):
        super().__init__()
        kernels = kernels or Kernels()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        theta, scaling = rope_settings(cfg)
        qkv_bias = self.qkv_bias or getattr(cfg, "attention_bias", False)
        rotary = RotaryEmbedding(head_dim, cfg.max_position_embeddings, theta, scaling, kernels.apply_rotary)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias, self.qk_norm, rotary, kernels)
                                    for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels.rms_norm, kernels.add_rms_norm,
                            kernels.sum_add_rms_norm)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Triton products for decode-sized batches (the kernels add no bias): o and down leave their products as
        # partial sums along K, which the RMSNorm after each sums (on one rank: no all-reduce to do); qkv plain
        splitk = kernels.splitk_gemm if tp_rank_size()[1] == 1 else None
        for layer in self.layers:
            for proj, fn, rows in ((layer.self_attn.o_proj, splitk, kernels.splitk_max_rows),
                                   (layer.mlp.down_proj, splitk, kernels.splitk_max_rows),
                                   (layer.self_attn.qkv_proj, kernels.qkv_gemm, kernels.qkv_gemm_max_rows)):
                if fn is not None and proj.bias is None:
                    proj.triton_gemm, proj.triton_max_rows = fn, rows

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of every new token: [N, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_name_to_param(self, name: str) -> tuple[str, object] | None:
        """Map a checkpoint tensor name to (our parameter name, shard id); None: skip it."""
        name = name.removeprefix("model.")
        if "rotary_emb" in name or (name.startswith("lm_head") and self.tie_word_embeddings):
            return None
        for ckpt, (ours, shard) in self.packed_modules.items():
            if f".{ckpt}." in name:
                return name.replace(ckpt, ours), shard
        return name, None

    def param_to_checkpoint_name(self, pname: str, shard) -> str:
        """The inverse, in the HF checkpoints' naming: the tensor that fills ``pname`` (its piece ``shard``)."""
        for ckpt, (ours, piece) in self.packed_modules.items():
            if piece == shard and f".{ours}." in pname:
                return f"model.{pname.replace(ours, ckpt)}"
        return pname if pname.startswith("lm_head") else f"model.{pname}"


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
