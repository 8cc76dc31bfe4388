# Solutions to chapter 07's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (graph_batch_sizes, count_ops, cfg, GraphedDecode, ...).

# %% exercise 1
def padding_fraction(buckets, max_batch):
    computed = [min(b for b in buckets if b >= n) for n in range(1, max_batch + 1)]  # rows of each batch's bucket
    return (sum(computed) - sum(range(1, max_batch + 1))) / sum(computed)


# %% exercise 2
# gate-up projection (linear), silu, mul, down projection (linear): the chunk into gate and up makes views only.
# torch.compile fuses silu and mul into one kernel; the two matrix multiplications stay cuBLAS (or mkl) calls.
import nanovllm.models.llama as llama_models
from nanovllm import kernels as nanovllm_kernels

mlp = llama_models.MLP(cfg, nanovllm_kernels.Kernels())  # the reference kernels: no fused path on any device
mlp_operators = sum(count_ops(mlp, torch.randn(8, cfg.hidden_size))[0].values())


# %% exercise 3
def overlap_speedup(host, gpu):
    # plain: host work, then the GPU's, one after the other; overlapped: whichever is longer sets the pace
    return (host + gpu) / max(host, gpu)


# %% exercise 4
class BucketedDecode:
    # one GraphedDecode per bucket; the smallest bucket that holds the batch runs it

    def __init__(self, model, buckets, *sizes):  # sizes: max_blocks, hidden_size, max_model_len, dtype, device
        # (the engine captures the largest bucket first, so that the smaller ones reuse its memory pool)
        self.steps = {b: GraphedDecode(model, b, *sizes) for b in sorted(buckets, reverse=True)}

    def bucket_for(self, n):
        fitting = [b for b in self.steps if b >= n]
        if not fitting:
            raise ValueError(f"no bucket holds {n} sequences (the largest is {max(self.steps)})")
        return min(fitting)

    def __call__(self, seqs, block_size):
        return self.steps[self.bucket_for(len(seqs))](seqs, block_size)  # pads the rest of the bucket
