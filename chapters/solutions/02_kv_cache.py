# Solutions to chapter 02's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (kv_bytes_per_token, simulate, prompt_lens, ...).

# %% exercise 1
def qwen25_7b_kv():
    per_token = kv_bytes_per_token(num_layers=28, num_kv_heads=4, head_dim=128, bytes_per_number=2)
    return per_token, 16 * 2**30 // per_token  # whole tokens only


# %% exercise 2
def mean_block_waste():
    lengths = [p + o for p, o in zip(prompt_lens, output_lens)]
    waste = lambda B: sum(math.ceil(L / B) * B - L for L in lengths) / len(lengths)
    return waste(16), waste(256)


# %% exercise 3
def steps_with_twice_the_cache():
    return {p: len(simulate(prompt_lens, output_lens, 2 * capacity, p)) for p in policies}


# %% exercise 4
class GrowingKVCache:
    # like a Python list: room for `initial` positions, twice as much whenever an append would not fit
    """Keys and values of one sequence, in tensors that double when full."""

    growth = 2  # how much larger the tensors get when an append does not fit

    def __init__(self, cfg, initial=16, device="cpu", dtype=torch.float32):
        self.shape = (cfg.num_layers, initial, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(self.shape, device=device, dtype=dtype)
        self.v = torch.zeros(self.shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self):
        return self.k.shape[1]

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    def append(self, layer, k, v):
        start, end = self.length, self.length + k.shape[0]
        if end > self.capacity:  # twice as large (as often as needed), the filled part copied over
            new = self.capacity
            while new < end:
                new *= self.growth
            for name in ("k", "v"):
                old = getattr(self, name)
                bigger = old.new_zeros(old.shape[0], new, *old.shape[2:])
                bigger[:, :start] = old[:, :start]
                setattr(self, name, bigger)
        self.k[layer, start:end], self.v[layer, start:end] = k, v
        return self.k[layer, :end], self.v[layer, :end]
