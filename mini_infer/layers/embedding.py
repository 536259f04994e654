"""Vocabulary-parallel embedding and LM head: each rank holds a slice of the vocabulary."""

import torch
import torch.nn.functional as F
from torch import nn

from mini_infer.distributed import get_tp_rank, get_tp_size
from mini_infer.distributed.communication_op import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from mini_infer.kernels import TORCH_OPS, KernelOps


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.vocab_size = vocab_size
        self.shard_size = (vocab_size + self.tp_size - 1) // self.tp_size
        self.start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = loaded[self.start : self.start + self.shard_size]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        y = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits; shares its weight with the embedding when tied."""

    def __init__(self, vocab_size: int, hidden: int, ops: KernelOps = TORCH_OPS) -> None:
        super().__init__(vocab_size, hidden)
        self.linear = ops.linear

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden, self.weight)
        if self.tp_size > 1:  # padded rows of the last shard are cut off below
            logits = tensor_model_parallel_all_gather(logits)
        return logits[:, : self.vocab_size]
