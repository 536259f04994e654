"""Tile configurations of the fused MoE kernel, by GPU and (experts, hidden, intermediate, dtype).

They live in fused_moe_configs.json, written by benchmarks/moe_sweep.py from measurements on a GPU.
A shape the file does not list gets its `untuned_default` entry, hand-written starting points that
were never measured, and a warning says so once. Within an entry, configs are bucketed by token
count: a batch takes the largest bucket at or below its size. The choice depends on shapes only, so
a CUDA graph of a given size always runs the config it was captured with.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
CONFIG_FILE = Path(__file__).with_name("fused_moe_configs.json")


@dataclass(frozen=True)
class MoeGemmConfig:
    """One grouped GEMM: row tile (pairs), column tile, K step, L2 swizzle group, launch settings."""

    block_m: int = 16
    block_n: int = 32
    block_k: int = 32
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class MoeGemvConfig:
    """The decode path: a program owns block_n output features of one (token, expert) pair."""

    block_n: int = 16
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class FusedMoeConfig:
    gemv_max_tokens: int  # batches of at most this many tokens take the GEMV path
    gemv: MoeGemvConfig
    gate_up: MoeGemmConfig
    down: MoeGemmConfig
    tuned: bool


# Off CUDA the kernels run in Triton's interpreter, where small tiles waste the least work.
INTERPRETER_CONFIG = FusedMoeConfig(2, MoeGemvConfig(), MoeGemmConfig(), MoeGemmConfig(), tuned=False)


def config_key(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype) -> str:
    return f"E={num_experts},H={hidden},N={intermediate},dtype={str(dtype).removeprefix('torch.')}"


@functools.cache
def _load_file(path: Path = CONFIG_FILE) -> dict:
    return json.loads(path.read_text())


def parse_entry(entry: dict, num_tokens: int) -> FusedMoeConfig:
    """The config of one file entry for a batch of num_tokens."""
    buckets = sorted(entry["buckets"].items(), key=lambda kv: int(kv[0]))
    chosen = buckets[0][1]
    for size, bucket in buckets:
        if int(size) <= num_tokens:
            chosen = bucket
    return FusedMoeConfig(
        gemv_max_tokens=int(entry["gemv_max_tokens"]),
        gemv=MoeGemvConfig(**entry["gemv"]),
        gate_up=MoeGemmConfig(**chosen["gate_up"]),
        down=MoeGemmConfig(**chosen["down"]),
        tuned=bool(entry.get("tuned", False)),
    )


@functools.cache
def _warn_untuned(device_name: str, key: str) -> None:
    logger.warning(
        "fused MoE: no tuned tile config for %s on %s; using the untuned defaults "
        "(run benchmarks/moe_sweep.py on this GPU to make one)",
        key,
        device_name,
    )


@functools.lru_cache(maxsize=4096)  # called by every MoE layer of every eager forward
def get_moe_config(
    num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, num_tokens: int, device: torch.device
) -> FusedMoeConfig:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    data = _load_file()
    name = torch.cuda.get_device_name(device)
    key = config_key(num_experts, hidden, intermediate, dtype)
    entry = data["configs"].get(name, {}).get(key)
    if entry is None:
        _warn_untuned(name, key)
        entry = data["untuned_default"]
    return parse_entry(entry, num_tokens)
