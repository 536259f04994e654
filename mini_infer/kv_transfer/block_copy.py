"""Gather KV blocks of every layer into one contiguous buffer, and scatter such a buffer back.

A buffer row is one block of *all* layers, as raw bytes: [num_blocks, block_bytes] uint8. That makes a
block a plain byte range whatever each layer stores (paged K/V today, an MLA latent tomorrow, mixed
dtypes), so one copy moves a run of blocks to pinned host memory, a file or another engine. The only
thing asked of a layer's cache tensor is which of its dimensions counts blocks (`BlockLayout`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Where a block lives in each layer's cache tensor: the block dimension and the bytes per block."""

    block_dims: tuple[int, ...]
    block_shapes: tuple[tuple[int, ...], ...]  # a block's shape in each layer, block dim moved first and dropped
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def from_shapes(cls, kv_cache_shape: Sequence[Callable[[int], tuple[int, ...]]], dtypes: Sequence[torch.dtype]):
        """kv_cache_shape[i](num_blocks): layer i's cache shape; the block dim is the one that grows."""
        dims, shapes = [], []
        for shape_of in kv_cache_shape:
            one, two = shape_of(1), shape_of(2)
            grown = [d for d, (a, b) in enumerate(zip(one, two)) if a != b]
            if len(grown) != 1:
                raise ValueError(f"a KV cache shape must have exactly one block dimension, got {one} vs {two}")
            dims.append(grown[0])
            shapes.append(tuple(s for d, s in enumerate(one) if d != grown[0]))
        return cls(tuple(dims), tuple(shapes), tuple(dtypes))

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], num_blocks: int) -> BlockLayout:
        """The layout of allocated cache tensors that hold num_blocks blocks each (num_blocks >= 2)."""

        def shape_of(t: torch.Tensor) -> Callable[[int], tuple[int, ...]]:
            dim = [d for d, s in enumerate(t.shape) if s == num_blocks][0]
            return lambda n: tuple(n if d == dim else s for d, s in enumerate(t.shape))

        return cls.from_shapes([shape_of(t) for t in tensors], [t.dtype for t in tensors])

    @property
    def layer_bytes(self) -> tuple[int, ...]:
        return tuple(
            math.prod(s) * torch.empty(0, dtype=dt).element_size() for s, dt in zip(self.block_shapes, self.dtypes)
        )

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers: a buffer row."""
        return sum(self.layer_bytes)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's view of a [n, block_bytes] uint8 buffer: [n, *block_shape] in the layer's dtype."""
        views, offset = [], 0
        for shape, dtype, nbytes in zip(self.block_shapes, self.dtypes, self.layer_bytes):
            views.append(buffer[:, offset : offset + nbytes].view(dtype).view(buffer.shape[0], *shape))
            offset += nbytes
        return views


def gather_blocks(
    tensors: Sequence[torch.Tensor], layout: BlockLayout, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The blocks block_ids (int64, on the tensors' device) of every layer as one [n, block_bytes] uint8
    buffer on that device: two kernels per layer (index_select, then a copy into the buffer's columns)."""
    n = block_ids.numel()
    if out is None:
        out = torch.empty(n, layout.block_bytes, dtype=torch.uint8, device=block_ids.device)
    for tensor, dim, rows in zip(tensors, layout.block_dims, layout.views(out)):
        rows.copy_(tensor.index_select(dim, block_ids).movedim(dim, 0))
    return out


def scatter_blocks(
    tensors: Sequence[torch.Tensor], layout: BlockLayout, block_ids: torch.Tensor, buffer: torch.Tensor
) -> None:
    """The inverse of gather_blocks: buffer row i becomes block block_ids[i] of every layer."""
    for tensor, dim, rows in zip(tensors, layout.block_dims, layout.views(buffer)):
        tensor.index_copy_(dim, block_ids, rows.movedim(0, dim))
