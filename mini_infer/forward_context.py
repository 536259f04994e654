"""The forward context: per-step attention metadata that attention layers read.

This is the one piece of module-level mutable state: the model runner sets it around each
forward pass so that layers deep in the model need no extra arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


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
    prefill_tiles: torch.Tensor | None = None  # [n, 2] work list of the Triton prefill kernel, built on the host


_forward_context: AttentionMetadata | None = None


def get_attn_metadata() -> AttentionMetadata:
    if _forward_context is None:
        raise RuntimeError("attention ran outside a forward context")
    return _forward_context


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    global _forward_context
    previous, _forward_context = _forward_context, meta
    try:
        yield
    finally:
        _forward_context = previous
