"""The forward context: per-step metadata that layers read (the attention's; the LoRA token -> slot index).

This is the one piece of module-level mutable state: the model runner sets it around each
forward pass so that layers deep in the model need no extra arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mini_infer.attention.backend import AttentionMetadata
    from mini_infer.kernels.lora import LoRAIndex

_forward_context: AttentionMetadata | None = None


def get_attn_metadata() -> AttentionMetadata:
    if _forward_context is None:
        raise RuntimeError("attention ran outside a forward context")
    return _forward_context


def get_lora_index() -> LoRAIndex | None:
    """This step's adapter slot per token, or None (outside a forward pass, or without enable_lora)."""
    return getattr(_forward_context, "lora", None)


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    global _forward_context
    previous, _forward_context = _forward_context, meta
    try:
        yield
    finally:
        _forward_context = previous
