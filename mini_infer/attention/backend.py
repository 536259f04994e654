"""The paged K/V attention backends: torch references (the CPU path) and Triton kernels.

A backend builds the metadata its kernels read from one step's inputs. The runner never asks which
backend it has: it hands over the step's StepInputs and a `put(name, array)` that turns a host array
into the device tensor the kernels read, a fresh one when the step runs eagerly, the static buffer of
a CUDA graph when it is captured or replayed. So eager, capture and replay build metadata with the
same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mini_infer.kernels import KernelOps, get_ops
from mini_infer.kernels.lora import LoRAIndex
from mini_infer.kernels.paged_attention import DecodeKeys, decode_keys
from mini_infer.kernels.prefill_attention import build_prefill_tiles, default_prefill_config, max_prefill_tiles
from mini_infer.worker.step_inputs import StepInputs

Put = Callable[[str, np.ndarray], torch.Tensor]


@dataclass
class AttentionMetadata:
    """A flat batch: decode tokens first (one per sequence), then prefill chunks."""

    slot_mapping: torch.Tensor  # [T] cache slot of every token (-1 = do not store)
    num_decode_tokens: int
    decode_seq_lens: torch.Tensor  # [D] keys per decoding sequence, its new token included
    decode_block_tables: torch.Tensor  # [D, max_blocks]
    prefill_cu_seqlens_q: torch.Tensor  # [P + 1] offsets of the chunks in the prefill part
    prefill_seq_lens: torch.Tensor  # [P] keys per prefilling sequence (cached + this chunk)
    prefill_block_tables: torch.Tensor  # [P, max_blocks]
    num_prefill_tokens: int
    prefill_tiles: torch.Tensor | None = None  # [n, 2] work list of the Triton prefill kernel
    decode_keys: DecodeKeys | None = None  # the pool slots and mask the torch decode attention reads
    lora: LoRAIndex | None = None  # enable_lora: each token's adapter slot (lora/manager.py fills it in)


class AttentionBackend:
    """Paged attention with the torch reference kernels. Every layer's decode attention reads the same
    pool slots, so they are built here once per step (on the host, where they cost least)."""

    supports_cuda_graphs = False

    def __init__(self, ops: KernelOps, block_size: int) -> None:
        self.ops, self.block_size = ops, block_size

    def build_metadata(self, inputs: StepInputs, put: Put) -> AttentionMetadata:
        meta = self.common_metadata(inputs, put)
        nd = inputs.num_decodes
        if nd:
            keys = decode_keys(inputs.block_tables[:nd], inputs.seq_lens[:nd], self.block_size)
            # not through `put`: its shape follows the step's longest row, so it is no static graph buffer
            # (this backend runs no CUDA graphs; a graph-input test's replays keep their captured metadata)
            if keys is not None:
                meta.decode_keys = keys.to(meta.decode_block_tables.device)
        return meta

    @staticmethod
    def common_metadata(inputs: StepInputs, put: Put) -> AttentionMetadata:
        """The fields every backend fills."""
        nd = inputs.num_decodes
        cu_seqlens = np.zeros(inputs.num_seqs - nd + 1, dtype=np.int32)
        np.cumsum(inputs.query_lens[nd:], out=cu_seqlens[1:])
        seq_lens = inputs.seq_lens.astype(np.int32)
        return AttentionMetadata(
            slot_mapping=put("slot_mapping", inputs.slot_mapping),
            num_decode_tokens=nd,
            decode_seq_lens=put("decode_seq_lens", seq_lens[:nd]),
            decode_block_tables=put("decode_block_tables", inputs.block_tables[:nd]),
            prefill_cu_seqlens_q=put("prefill_cu_seqlens_q", cu_seqlens),
            prefill_seq_lens=put("prefill_seq_lens", seq_lens[nd:]),
            prefill_block_tables=put("prefill_block_tables", inputs.block_tables[nd:]),
            num_prefill_tokens=inputs.num_tokens - nd,
        )


class TritonAttentionBackend(AttentionBackend):
    """The Triton kernels. Their prefill kernel takes a host-built work list of (sequence, query tile),
    sized by the step's token and sequence counts alone, so one launch shape serves every batch of a
    CUDA graph's size."""

    supports_cuda_graphs = True

    def __init__(self, ops: KernelOps, block_size: int, device: torch.device) -> None:
        super().__init__(ops, block_size)
        self.block_m = default_prefill_config(device).block_m

    def build_metadata(self, inputs: StepInputs, put: Put) -> AttentionMetadata:
        meta = self.common_metadata(inputs, put)
        nd = inputs.num_decodes
        capacity = max_prefill_tiles(inputs.num_tokens - nd, inputs.num_seqs - nd, self.block_m)
        tiles = build_prefill_tiles(inputs.query_lens[nd:], inputs.seq_lens[nd:], self.block_m, capacity)
        meta.prefill_tiles = put("prefill_tiles", tiles)
        return meta


def get_attention_backend(kernel_backend: str, block_size: int, device: torch.device) -> AttentionBackend:
    ops = get_ops(kernel_backend)
    if kernel_backend == "triton":
        return TritonAttentionBackend(ops, block_size, device)
    return AttentionBackend(ops, block_size)
