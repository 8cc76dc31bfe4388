"""Paged KV blocks with prefix caching.

The cache is cut into fixed-size blocks; a sequence owns a list of them (its block table).  A block that
is full and computed gets a hash chained from its predecessor's hash and its own tokens, so two requests
whose prompts share a prefix find the same blocks and share them (ref counts).  A freed block keeps its
hash and contents: it stays findable until the cache needs it, and blocks are reclaimed least recently
freed first (an ``OrderedDict`` used as an LRU queue).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence
from nanovllm.utils import cdiv


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and its K/V computed
        self.token_ids: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


def block_hash(token_ids, prefix_hash: int | None) -> int:
    """Hash of one full block, chained: it depends on every token before it too."""
    h = xxhash.xxh64()
    if prefix_hash is not None:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_kvcache_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first = reclaimed first
        self.hash_to_block: dict[int, int] = {}
        self.num_hashed: dict[int, int] = {}  # seq_id -> how many of its blocks are hashed
        self.hit_tokens = 0  # prefix-cache statistics, for the book
        self.queried_tokens = 0

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding this sequence's longest cached prefix of full blocks (none for a request that
        asks for ``prompt_logprobs``: they need every prompt position's logits)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        hits, h = [], None
        block_size = self.block_size
        for i in range(len(seq) // block_size):
            tokens = tuple(seq.token_ids[i * block_size:(i + 1) * block_size])
            h = block_hash(tokens, h)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
        if hits and len(hits) * block_size == len(seq):
            hits.pop()  # keep at least one token to compute (its logits give the next token)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # free cached blocks we would take
        return self.blocks_for(len(seq)) - len(hits) + reclaimed <= self.num_free_blocks

    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        return self.blocks_for(len(seq) + lookahead) - len(seq.block_table) <= self.num_free_blocks

    # -- changes -------------------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None and self.hash_to_block.get(block.hash) == bid:
            del self.hash_to_block[block.hash]  # evicted: its contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return bid

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, sharing cached prefix blocks."""
        assert not seq.block_table, f"sequence {seq.seq_id} already has blocks"
        hits = self._cached_prefix(seq)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(self.blocks_for(len(seq)) - len(hits))]
        seq.num_computed_tokens = len(hits) * self.block_size
        self.num_hashed[seq.seq_id] = len(hits)
        self.queried_tokens += len(seq)
        self.hit_tokens += seq.num_computed_tokens

    def append_slot(self, seq: Sequence, lookahead: int = 0) -> None:
        """Make sure the sequence has a block for its last token (a decode step), and for ``lookahead`` more
        (the draft tokens of speculative decoding)."""
        while len(seq.block_table) < self.blocks_for(len(seq) + lookahead):
            seq.block_table.append(self._take_free_block())

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past the sequence's tokens (taken for draft tokens that were rejected).  They
        were never hashed: only computed tokens are (``register_computed``), and rejected ones never are."""
        keep = self.blocks_for(len(seq))
        for bid in reversed(seq.block_table[keep:]):
            block = self.blocks[bid]
            assert block.ref_count == 1 and block.hash is None, f"block {bid} is shared or cached"
            block.ref_count = 0
            self.free[bid] = None
            self.free.move_to_end(bid, last=False)
        del seq.block_table[keep:]

    def register_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        block_size = self.block_size
        start, end = self.num_hashed.get(seq.seq_id, 0), seq.num_computed_tokens // block_size
        prev = self.blocks[seq.block_table[start - 1]].hash if start > 0 else None
        for i in range(start, end):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * block_size:(i + 1) * block_size])
            block.hash, block.token_ids = block_hash(tokens, prev), tokens
            self.hash_to_block.setdefault(block.hash, block.block_id)  # an identical block may be there already
            prev = block.hash
        self.num_hashed[seq.seq_id] = max(start, end)

    def deallocate(self, seq: Sequence) -> None:
        """Release a sequence's blocks.  Blocks whose count drops to zero join the free queue; cached
        (hashed) ones at the back, so they stay findable longest, uncached ones at the front."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            assert block.ref_count > 0, f"block {bid} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
                if block.hash is None:
                    self.free.move_to_end(bid, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self.num_hashed.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence is using."""
        for bid in self.free:
            block = self.blocks[bid]
            if block.hash is not None and self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
