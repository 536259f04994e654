"""The paged KV pool: one tensor per attention layer, shaped as the layer asks, and how many blocks fit.

Layers say what a block of theirs holds (`kv_cache_shape`): paged keys and values today, a latent
vector for MLA tomorrow; the pool only multiplies out their bytes and binds each layer its tensor. Its
dtype is the model's, or float8_e4m3fn with kv_cache_dtype="fp8": one byte an element, so the same memory
holds twice the blocks of a 16-bit pool (docs/quantization.md, "FP8 KV cache").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from mini_infer.config import EngineConfig
from mini_infer.kv_transfer.block_copy import BlockLayout

logger = logging.getLogger(__name__)


class KVCache:
    def __init__(self, layers: list[nn.Module], block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        if dtype == torch.float8_e4m3fn:
            unsupported = sorted(
                {type(layer).__name__ for layer in layers if not getattr(layer, "supports_fp8_kv_cache", False)}
            )
            if unsupported:
                raise ValueError(
                    f"kv_cache_dtype='fp8' is not supported by {', '.join(unsupported)} layers yet (their kernels "
                    "read the cache in the model dtype); use kv_cache_dtype='auto'"
                )
        self.layers, self.block_size, self.dtype, self.device = layers, block_size, dtype, device
        self.tensors: list[torch.Tensor] = []

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return sum(math.prod(layer.kv_cache_shape(1, self.block_size)) for layer in self.layers) * elem

    @property
    def copy_dtype(self) -> torch.dtype:
        """The dtype blocks are copied as (swapping, KV connectors): float8 pools as their bytes."""
        return torch.uint8 if self.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else self.dtype

    @property
    def layout(self) -> BlockLayout:
        """Where a block lives in each layer's tensor, in copy_dtype: what swapping and KV connectors copy."""
        return BlockLayout.from_shapes(
            [lambda n, layer=layer: layer.kv_cache_shape(n, self.block_size) for layer in self.layers],
            [self.copy_dtype] * len(self.layers),
        )

    @property
    def copy_views(self) -> list[torch.Tensor]:
        """The pool's tensors as the layout copies them."""
        return [t.view(self.copy_dtype) for t in self.tensors]

    def allocate(self, num_blocks: int) -> None:
        """A pool of num_blocks blocks, bound to the layers (a smaller scratch one while profiling)."""
        self.tensors = []
        for layer in self.layers:
            shape = layer.kv_cache_shape(num_blocks, self.block_size)
            self.tensors.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            layer.bind_kv_cache(self.tensors[-1])


def num_kv_blocks(
    config: EngineConfig, kv_cache: KVCache, max_model_len: int, profile_free_memory: Callable[[], int]
) -> int:
    """How many KV blocks fit: forced, or from free GPU memory after a profiling pass, or (CPU) from
    `cpu_kv_cache_gib`. Never more than max_num_seqs full-length sequences need."""
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    per_seq = -(-max_model_len // config.block_size)
    enough = config.max_num_seqs * per_seq
    budget = profile_free_memory() if kv_cache.device.type == "cuda" else int(config.cpu_kv_cache_gib * 2**30)
    num_blocks = min(budget // kv_cache.block_bytes, enough)
    if num_blocks < per_seq:
        raise ValueError(
            f"the KV pool fits {max(num_blocks, 0)} blocks of {config.block_size} tokens, fewer than one "
            f"sequence of max_model_len={max_model_len} needs ({per_seq}); lower max_model_len or "
            "raise gpu_memory_utilization / cpu_kv_cache_gib"
        )
    return int(num_blocks)


def graph_pool_reserve(largest_pass: int, outputs: int) -> int:
    """The CUDA graph pool's reserve: the largest pass's transient memory, which the graphs share (with
    slack: 1.5x and 64 MiB), plus the outputs every graph keeps for itself (cuda_graphs.graph_output_bytes)."""
    return int(1.5 * largest_pass) + 2**26 + outputs


def profile_free_gpu_memory(
    config: EngineConfig,
    kv_cache: KVCache,
    max_model_len: int,
    run_batch: Callable[[list[int]], int],
    graph_batch: int | None,
    graph_outputs: Callable[[int], int],
) -> int:
    """Runs the largest batch the scheduler can form on a throwaway cache and returns the bytes left for
    the KV pool under gpu_memory_utilization, after what CUDA graphs will need. run_batch(lens) runs a step
    of prompts of those lengths and returns the bytes per token of the model's output; graph_batch: the
    largest decode batch graphs capture (None: no graphs); graph_outputs(those bytes): the bytes all graphs
    keep for their outputs (the target's, and a proposer's)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    num_tokens = min(config.max_num_batched_tokens, config.max_num_seqs * max_model_len)
    num_seqs = min(config.max_num_seqs, num_tokens)
    lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
    kv_cache.allocate(sum(-(-n // config.block_size) for n in lens))
    output_bytes = run_batch(lens)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    graph_reserve = 0
    if graph_batch is not None:  # graphs share one pool of their own: reserve its largest pass
        torch.cuda.reset_peak_memory_stats()
        kv_cache.allocate(graph_batch)  # one block per one-token sequence: its writes stay in the cache
        base = torch.cuda.memory_allocated()
        run_batch([1] * graph_batch)
        torch.cuda.synchronize()
        largest = torch.cuda.max_memory_allocated() - base
        if config.cuda_graph_prefill:
            largest = max(largest, peak_extra)
        graph_reserve = graph_pool_reserve(largest, graph_outputs(output_bytes))
    kv_cache.allocate(0)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    budget = int(total * config.gpu_memory_utilization) - (total - free) - peak_extra - graph_reserve
    logger.info(
        "profiling: %.2f GiB in use, activation peak %.2f GiB, CUDA graphs %.2f GiB, %.2f GiB left for the KV pool",
        (total - free) / 2**30,
        peak_extra / 2**30,
        graph_reserve / 2**30,
        budget / 2**30,
    )
    return max(budget, 0)
