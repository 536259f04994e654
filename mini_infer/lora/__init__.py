"""Multi-LoRA serving: PEFT adapters in preallocated device slots, applied per token in mixed batches.

request.py names an adapter (LoRARequest), adapter.py reads and checks a PEFT folder, layers.py wraps a
projection's linear method to add each token's adapter delta (kernels/lora.py), manager.py owns the
device slots (least recently used out when more adapters than `max_loras` take turns). See docs/lora.md.
"""

from mini_infer.lora.request import LoRARequest

__all__ = ["LoRARequest"]
