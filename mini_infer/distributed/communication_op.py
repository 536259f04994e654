"""The collectives of a forward pass and a step, over the tensor-parallel group (no-ops for one rank).

NCCL on CUDA (inside CUDA graphs too: the collective is captured like any kernel), gloo on CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mini_infer.distributed.parallel_state import get_tp_size


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the ranks, in place (row-parallel outputs, vocab-parallel embeddings, experts)."""
    if get_tp_size() > 1:
        dist.all_reduce(x)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's x along the last dim (vocab-parallel logits). Every rank gets them,
    which on NCCL costs what a gather to rank 0 would, though only rank 0 samples."""
    size = get_tp_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_from_driver(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x on every rank, in place (the sampled tokens: the next step's pending inputs)."""
    if get_tp_size() > 1:
        dist.broadcast(x, src=0)
    return x


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest value any rank has (the KV pool: each rank profiles its own memory)."""
    if get_tp_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
