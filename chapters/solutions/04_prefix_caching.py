# Solutions to chapter 04's exercises. Each block replaces the exercise cell of the same number; it runs in the
# notebook's namespace, so it uses what the chapter defined (PrefixCachingAllocator, prefix_hashes, a, hit_rate,
# workload, hot_and_cold, cached_per_request, ...).

# %% exercise 1
def cached_tokens():
    # 150 shared tokens hold 9 full blocks (144 tokens); the same 256 tokens are 16 full blocks, but the last
    # one is computed again: its last token's logits give the next token
    alloc = PrefixCachingAllocator(num_blocks=40, block_size=16)
    base = list(range(1000, 1256))
    alloc.allocate(0, base)
    alloc.register(0, base, len(base))
    return alloc.allocate(1, base[:150] + [7] * 106), alloc.allocate(2, base)


# %% exercise 2
def hashes_that_change():
    # block 0's tokens changed, and every later hash is chained from block 0's
    changed = [999] + a[1:]
    return [old != new for old, new in zip(prefix_hashes(a, 16), prefix_hashes(changed, 16))]


# %% exercise 3
def hit_rate_long_questions():
    # a request now takes 25 blocks: the two requests between two uses of a system prompt evict it entirely
    return hit_rate(workload(question_len=200), 48, "ours")


# %% exercise 4
def cached_in_same_step():
    # blocks are hashed only once computed, after the step: the twin admitted in the same step finds nothing
    from nanovllm.config import EngineConfig
    from nanovllm.engine.scheduler import Scheduler

    scheduler = Scheduler(EngineConfig(), BlockManager(16, 16, enable_prefix_caching=True))
    twins = [Sequence(i, list(range(64)), SamplingParams(max_tokens=4)) for i in range(2)]
    for seq in twins:
        scheduler.add(seq)
    scheduler.schedule()  # both are admitted in this one step
    return twins[1].num_cached_tokens


# %% exercise 5
import collections

from nanovllm.engine import block_manager


class FIFOBlockManager(block_manager.BlockManager):
    # FIFO: the block cached first is evicted first; a cache hit does not renew it.

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached_at: dict[int, int] = {}  # block id -> when it got its hash
        self.clock = 0

    def register_computed(self, seq):
        super().register_computed(seq)
        for bid in seq.block_table:
            if self.blocks[bid].hash is not None and bid not in self.cached_at:
                self.cached_at[bid] = self.clock
                self.clock += 1

    def _take_free_block(self):
        bid = super()._take_free_block()
        self.cached_at.pop(bid, None)  # its contents are about to be overwritten: cached again, it is new
        return bid

    def deallocate(self, seq):
        super().deallocate(seq)
        # uncached blocks first, in the order BlockManager left them (sorted is stable), then the cached ones,
        # the first cached first
        order = sorted(self.free, key=lambda b: (b in self.cached_at, self.cached_at.get(b, -1)))
        self.free = collections.OrderedDict.fromkeys(order)
