# Solutions to chapter 09's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (shard, valid_tp_sizes, ...).

# %% exercise 1
# The size must divide the 28 query heads: 1, 2, 4, 7, 14, 28. It must also divide the 4 KV heads (1, 2, 4)
# or be a multiple of 4, so that each KV head is replicated on a whole number of ranks (28); 7 and 14 are
# neither. (valid_tp_sizes(28, 4) and check_head_split's message agree.)
qwen25_7b_sizes = [1, 2, 4, 28]


# %% exercise 2
def sharded_argmax(parts):
    # what each rank sends: its local maximum and where it is, two numbers per row
    local_idx = torch.stack([p.argmax(-1) for p in parts])  # [ranks, batch]: the first maximum in each slice
    local_max = torch.stack([p.gather(-1, i[:, None])[:, 0] for p, i in zip(parts, local_idx)])
    best_rank = local_max.argmax(0)  # the first rank holding the largest value: the lowest token id on a tie
    offsets = torch.tensor([r * parts[0].shape[-1] for r in range(len(parts))], device=local_idx.device)
    return (local_idx + offsets[:, None]).gather(0, best_rank[None])[0]


# %% exercise 3
def all_reduce_bytes(num_layers, hidden_size, batch, bytes_per_value):
    # two all-reduces per layer (attention, MLP) and one for the embedding, each of [batch, hidden_size]
    return (2 * num_layers + 1) * batch * hidden_size * bytes_per_value
