"""Token embedding and LM head, split over tensor-parallel ranks by vocabulary rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import all_gather, all_reduce, current_group, tp_rank_size
from nanovllm.layers.linear import check_shape, make_loadable, materialize, narrow


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_size()
        self.tp_group = current_group()
        if vocab_size % self.tp_size:
            raise ValueError(f"vocab size {vocab_size} does not divide by tensor_parallel_size={self.tp_size}")
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.shard_size = vocab_size // self.tp_size
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = make_loadable(self, nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False))

    def checkpoint_shape(self, param, shard_id=None) -> tuple[int, int]:
        """The whole table's shape, checked before this rank reads its rows."""
        return self.vocab_size, self.hidden_size

    def weight_loader(self, param, loaded, *args):
        check_shape(loaded, self.checkpoint_shape(param))
        param.data.copy_(materialize(narrow(loaded, 0, self.vocab_start, self.shard_size)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mine.unsqueeze(-1)
        return all_reduce(y, self.tp_group)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the given hidden states; each rank computes its vocabulary slice, rank 0 gets them all."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return all_gather(F.linear(hidden, self.weight), self.tp_group)
