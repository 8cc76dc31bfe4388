# Solutions to chapter 08's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (triton, tl, store_kv_kernel, ...).

# %% exercise 1
@triton.jit
def store_kv_skip_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    # as store_kv_kernel, except that a padding row (slot -1) has every column masked out: no load, no store
    i = tl.program_id(0)
    slot = tl.load(slots_ptr + i)
    cols = tl.arange(0, ROW_PAD)
    keep = cols < tl.where(slot >= 0, ROW, 0)  # a padding row keeps no column
    tl.store(k_cache_ptr + slot * ROW + cols, tl.load(k_ptr + i * ROW + cols, mask=keep), mask=keep)
    tl.store(v_cache_ptr + slot * ROW + cols, tl.load(v_ptr + i * ROW + cols, mask=keep), mask=keep)


def store_kv_skip(k, v, k_cache, v_cache, slots):
    # k, v: [N, kv_heads, head_dim], contiguous; caches: [num_blocks, block_size, kv_heads, head_dim]; slots: [N]
    n, kv_heads, head_dim = k.shape
    row = kv_heads * head_dim
    store_kv_skip_kernel[(n,)](k, v, k_cache, v_cache, slots, ROW=row, ROW_PAD=triton.next_power_of_2(row))


# %% exercise 2
def kv_bytes_read(batch, ctx, layers, kv_heads, head_dim, itemsize):
    # every token of every sequence holds a key and a value per layer and KV head; each is read once.
    # (Our kernel of 8.4 requests each KV head once per query head of its group: 9 / 3 = 3 times as many.)
    return 2 * batch * ctx * layers * kv_heads * head_dim * itemsize


# %% exercise 3
# 4 sequences x 8 KV heads = 32 (sequence, KV head) programs, fewer than two per multiprocessor (264): split.
# Enough splits for about four programs per multiprocessor: ceil(4 * 132 / 32) = ceil(16.5) = 17. A split of
# 8,192 tokens cut 17 ways keeps more than two tiles of 64 tokens (the limit allows 8192 // 64 // 2 = 64 splits).
splits_for_4_sequences = 17
