"""The LoRA linear method: a projection's own method, plus each token's adapter delta.

It wraps whatever method the layer has (unquantized, or 8-bit from quantization/), so an adapter
applies to either. The slots' weights are preallocated per projection: A as [max_loras, S * R, in]
(the S slices of a fused q/k/v or gate/up share one input), B as [max_loras, out, R], R =
max_lora_rank; an adapter of a lower rank, or one that leaves a slice out, fills the rest with zeros.
Which slot each token uses comes from the forward context (the step's LoRAIndex); the product is the
kernel set's lora_shrink then lora_expand (kernels/lora.py), in place on the base output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mini_infer.forward_context import get_lora_index
from mini_infer.kernels import KernelOps

if TYPE_CHECKING:
    from mini_infer.layers.linear import LinearBase


class LoRALinearMethod:
    def __init__(
        self,
        base: object,
        slices: list[int],
        in_features: int,
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        ops: KernelOps,
    ) -> None:
        """base: the layer's linear method; slices: the widths of its output slices (one if unfused)."""
        self.base, self.ops, self.max_rank = base, ops, max_rank
        self.slices = tuple(int(x) for x in torch.tensor([0, *slices]).cumsum(0).tolist())  # first columns, then N
        self.lora_a = torch.zeros(max_loras, len(slices) * max_rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_loras, self.slices[-1], max_rank, dtype=dtype, device=device)

    def create_weights(self, layer: LinearBase) -> None:
        self.base.create_weights(layer)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.base.apply(layer, x, bias)
        index = get_lora_index()
        if index is None:
            return y
        rows = x.reshape(-1, x.shape[-1])
        s = self.ops.lora_shrink(rows, self.lora_a, index)
        self.ops.lora_expand(y.view(-1, y.shape[-1]), s, self.lora_b, index, self.slices)
        return y

    def set_slot(self, slot: int, weights: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Writes one adapter's (slice, A [r, in], B [out, r]) into a slot; what it leaves out is zero. The
        copies are queued (from pinned host memory on CUDA, LoRAModelManager.load); the caching host allocator
        keeps a pinned block until its copies ran, even if the adapter is removed meanwhile."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        r_max = self.max_rank
        for i, a, b in weights:
            rank = a.shape[0]
            self.lora_a[slot, i * r_max : i * r_max + rank].copy_(a, non_blocking=True)
            self.lora_b[slot, self.slices[i] : self.slices[i + 1], :rank].copy_(b, non_blocking=True)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
