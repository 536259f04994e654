"""This process's place in the tensor-parallel group: rank, size, and whether MoE experts are split.

There is no pipeline or data parallelism, so the tensor-parallel group is torch.distributed's default
(world) group, and expert parallelism, when on, splits the experts over that same group (vLLM's
`enable_expert_parallel`: EP size = TP size). Layers read the rank and size while they are built, so
the group is joined before the model is constructed.

`_STATE` is the second named global beside the forward context: set once by `init_distributed` when
a rank joins its group and cleared by `destroy_distributed`; a single-process engine never sets it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from transformers import PretrainedConfig


@dataclass(frozen=True)
class ParallelState:
    rank: int
    world_size: int
    expert_parallel: bool


_STATE: ParallelState | None = None


def get_tp_rank() -> int:
    return _STATE.rank if _STATE is not None else 0


def get_tp_size() -> int:
    return _STATE.world_size if _STATE is not None else 1


def get_ep_size() -> int:
    """Ranks the experts are split over (1: each rank holds every expert, a slice of each)."""
    return _STATE.world_size if _STATE is not None and _STATE.expert_parallel else 1


def collective_timeout() -> timedelta:
    """How long a collective (start-up included) may wait for a peer before it fails instead of hanging."""
    return timedelta(seconds=float(os.environ.get("MINI_INFER_DIST_TIMEOUT", "300")))


def init_distributed(
    rank: int, world_size: int, init_method: str, backend: str, expert_parallel: bool, device_index: int | None
) -> None:
    """Joins the group (gloo on CPU, NCCL on CUDA) and records this rank; every rank calls it."""
    global _STATE
    if _STATE is not None or dist.is_initialized():
        raise ValueError(
            "this process already belongs to a process group: shut the other engine down "
            "(LLMEngine.shutdown()) before starting another with tensor_parallel_size > 1"
        )
    kwargs = {}
    if backend == "nccl" and device_index is not None:
        import torch

        torch.cuda.set_device(device_index)
        kwargs["device_id"] = torch.device("cuda", device_index)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=collective_timeout(), **kwargs
    )
    _STATE = ParallelState(rank, world_size, expert_parallel)


def check_no_live_group() -> None:
    """ValueError if a tensor-parallel engine still holds this process's group. Any new engine would be
    caught by it: its layers would read that group's rank and size, and its first collective would wait
    on the other engine's workers until the timeout. (A group of the user's own, torchrun's say, does not
    matter to a one-rank engine.)"""
    if _STATE is not None:
        raise ValueError(
            "this process already belongs to a tensor-parallel group: shut the other engine down "
            "(LLMEngine.shutdown()) before starting another engine"
        )


def destroy_distributed() -> None:
    global _STATE
    _STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()


def check_parallel_sizes(config: PretrainedConfig, tp: int, expert_parallel: bool) -> None:
    """ValueError, before any process starts, for a model that `tp` ranks cannot split: attention heads
    and intermediate sizes must divide; KV heads must divide or be divided by tp (fewer KV heads than
    ranks are replicated); the experts must divide with expert parallelism. The vocabulary is padded
    to a multiple of tp, so it always splits."""
    if tp == 1:
        if expert_parallel:
            raise ValueError("enable_expert_parallel needs tensor_parallel_size > 1 (experts are split over its ranks)")
        return
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {heads} attention heads")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} and the model's {kv_heads} KV heads: one must divide the other "
            "(KV heads are split when there are more of them, replicated when fewer)"
        )
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    if expert_parallel and not experts:
        raise ValueError(f"enable_expert_parallel needs a mixture-of-experts model; {config.model_type} has no experts")
    if expert_parallel and experts % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {experts} experts (expert parallel)")
    sizes = {"intermediate_size": getattr(config, "intermediate_size", None)}
    if experts and not expert_parallel:
        sizes["moe_intermediate_size"] = getattr(config, "moe_intermediate_size", None) or sizes["intermediate_size"]
    sizes["shared_expert_intermediate_size"] = getattr(config, "shared_expert_intermediate_size", None)
    for name, size in sizes.items():
        if size and size % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {name}={size}")
