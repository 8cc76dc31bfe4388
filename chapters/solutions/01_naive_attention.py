# Solutions to chapter 01's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (cfg, naive_attention, ...).

# %% exercise 1
def count_parameters(cfg):
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    attention = d * cfg.num_heads * cfg.head_dim * 2 + d * kv * 2  # q and o, k and v
    mlp = 3 * d * cfg.intermediate_size  # gate, up, down
    # the embedding (the LM head is the same matrix), the layers with their two norm gains, the final norm
    return cfg.vocab_size * d + cfg.num_layers * (attention + mlp + 2 * d) + d


# %% exercise 2
def gqa_attention_grouped(q, k, v):
    T, H, D = q.shape
    S, Hkv, _ = k.shape
    qg = q.view(T, Hkv, H // Hkv, D)  # query heads grouped by the KV head they share
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    out = torch.empty_like(qg)
    for j in range(Hkv):
        scores = torch.einsum("tgd,sd->gts", qg[:, j], k[:, j]) / D ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[:, j] = torch.einsum("gts,sd->tgd", probs, v[:, j])
    return out.reshape(T, H, D)


# %% exercise 3
def tokens_processed(P, n):
    # without a cache step t runs over P + t tokens; with one, the prompt once and then one token per step
    return sum(P + t for t in range(n)), P + (n - 1)


# %% exercise 4
def add_rms_norm(x, residual, weight, eps):
    stream = x + residual  # the residual stream, handed on unnormalized
    h = stream.float()  # the mean of squares in float32, whatever the model's dtype
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), stream
