"""LoRAModelManager: the model's LoRA projections, the adapters registered on the host, and which adapter
holds each of the `max_loras` device slots.

Registered adapters keep a host copy (adapter.py); a step's adapters are put in slots before its forward
pass (`activate`), the least recently used slot giving way when all are taken. The scheduler admits at
most max_loras distinct adapters among the running sequences, so one step's adapters always fit. A slot
is rewritten in place on the device: the copy is queued on the same stream after the steps already in
flight, so those still read the adapter they were scheduled with.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from mini_infer.kernels import KernelOps
from mini_infer.kernels.lora import LoRAIndex, build_lora_tiles, lora_block_m
from mini_infer.lora.adapter import SUPPORTED_MODULES, LoRAAdapter, Target, load_adapter
from mini_infer.lora.layers import LoRALinearMethod
from mini_infer.lora.request import LoRARequest
from mini_infer.quantization.fused_act_quant import fuse_act_quant

_QKV_SLICES = {"q": 0, "k": 1, "v": 2}


def _slice_widths(layer: nn.Module) -> list[int]:
    """The output slices of a projection: q/k/v, the merged parts, or the whole output."""
    from mini_infer.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    if isinstance(layer, QKVParallelLinear):
        kv = layer.num_kv_heads * layer.head_dim
        return [layer.num_heads * layer.head_dim, kv, kv]
    if isinstance(layer, MergedColumnParallelLinear):
        return [size // layer.tp_size for size in layer.out_sizes]
    return [layer.out_features]


class LoRAModelManager:
    def __init__(
        self,
        model: nn.Module,
        max_loras: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        ops: KernelOps,
    ) -> None:
        """Wraps every projection an adapter may target (q/k/v/o/gate/up/down) in a LoRALinearMethod."""
        from mini_infer.layers.linear import LinearBase, ReplicatedLinear

        self.max_loras, self.max_lora_rank, self.dtype, self.device = max_loras, max_lora_rank, dtype, device
        self.layers: dict[str, LoRALinearMethod] = {}
        self.targets: dict[str, Target] = {}  # checkpoint module name -> where its adapter goes
        packed = getattr(model, "packed_modules_mapping", {})
        for name, module in model.named_modules():
            if not isinstance(module, LinearBase) or isinstance(module, ReplicatedLinear):
                continue
            prefix, _, leaf = name.rpartition(".")
            parts = [(ckpt, shard) for ckpt, (ours, shard) in packed.items() if ours == leaf] or [(leaf, 0)]
            if not all(ckpt in SUPPORTED_MODULES for ckpt, _ in parts):
                continue
            widths = _slice_widths(module)
            method = LoRALinearMethod(
                module.quant_method, widths, module.in_features, max_loras, max_lora_rank, dtype, device, ops
            )
            module.quant_method = method
            self.layers[name] = method
            for ckpt, shard in parts:
                index = _QKV_SLICES.get(shard, shard)
                full = f"{prefix}.{ckpt}" if prefix else ckpt
                self.targets[full] = Target(name, index, module.in_features, widths[index])
        fuse_act_quant(model)  # the wrapped projections' shrink reads the model-dtype input: no 8-bit one
        self.adapters: dict[int, LoRAAdapter] = {}
        self.slots: OrderedDict[int, int] = OrderedDict()  # adapter id -> its slot, least recently used first

    # -- registration ---------------------------------------------------------------------------
    def load(self, request: LoRARequest) -> LoRAAdapter:
        """Reads and checks an adapter's folder (ValueError if it cannot apply); registers nothing. On CUDA
        its host weights are pinned, so activate's slot copies are asynchronous DMA, not a staged copy that
        blocks the host."""
        adapter = load_adapter(request, self.targets, self.max_lora_rank, self.dtype)
        if self.device.type == "cuda":
            adapter.weights = {
                name: [(i, a.pin_memory(), b.pin_memory()) for i, a, b in parts]
                for name, parts in adapter.weights.items()
            }
        return adapter

    def add(self, adapter: LoRAAdapter) -> None:
        self.adapters[adapter.request.lora_int_id] = adapter

    def remove(self, lora_id: int) -> bool:
        if self.adapters.pop(lora_id, None) is None:
            return False
        slot = self.slots.pop(lora_id, None)
        if slot is not None:
            for method in self.layers.values():
                method.clear_slot(slot)
        return True

    # -- a step ---------------------------------------------------------------------------------
    def activate(self, lora_ids: Iterable[int]) -> dict[int, int]:
        """Puts a step's adapters in slots (loading those that hold none) and returns adapter id -> slot."""
        wanted = list(dict.fromkeys(lora_ids))
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step uses {len(wanted)} adapters, more than max_loras={self.max_loras}")
        for lora_id in wanted:
            if lora_id in self.slots:
                self.slots.move_to_end(lora_id)
                continue
            free = set(range(self.max_loras)) - set(self.slots.values())
            if free:
                slot = min(free)
            else:  # the least recently used adapter not in this step gives way
                victim = next(i for i in self.slots if i not in wanted)
                slot = self.slots.pop(victim)
            adapter = self.adapters[lora_id]
            for name, method in self.layers.items():
                method.set_slot(slot, adapter.weights.get(name, []))
            self.slots[lora_id] = slot
        return {lora_id: self.slots[lora_id] for lora_id in wanted}

    def build_index(self, token_slots: np.ndarray | None, num_tokens: int, put) -> LoRAIndex:
        """The step's LoRAIndex through `put` (fresh tensors, or a CUDA graph's buffers): shapes depend on
        the token count and max_loras alone, so one graph serves every mix of adapters."""
        if token_slots is None:
            token_slots = np.full(num_tokens, -1, dtype=np.int32)
        block_m = lora_block_m(num_tokens)
        sorted_tokens, tiles = build_lora_tiles(token_slots, self.max_loras, block_m)
        return LoRAIndex(
            put("lora_token_slots", token_slots.astype(np.int32)),
            put("lora_sorted_tokens", sorted_tokens),
            put("lora_tiles", tiles),
            put("lora_num_tiles", np.array([(tiles[:, 0] >= 0).sum()], dtype=np.int32)),
            block_m,
        )
