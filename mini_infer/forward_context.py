"""The forward context: per-step attention metadata that attention layers read.

This is the one piece of module-level mutable state: the model runner sets it around each
forward pass so that layers deep in the model need no extra arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mini_infer.attention.backend import AttentionMetadata

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
