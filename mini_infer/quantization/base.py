"""What every quantization config answers: which linear method a projection gets (None: unquantized)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from mini_infer.quantization.w8a8 import W8A8LinearMethod


def matches_any(names: list[str], patterns: list[str]) -> bool:
    """compressed-tensors / HF ignore lists: exact module names, name suffixes, or `re:` regexes."""
    for pattern in patterns:
        for name in names:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], name):
                    return True
            elif name == pattern or name.endswith("." + pattern):
                return True
    return False


class QuantizationConfig(ABC):
    name: str
    online: bool  # weights quantized by the engine at load (not read 8-bit from the checkpoint)
    ignore: list[str]

    @abstractmethod
    def linear_method(self) -> W8A8LinearMethod:
        """A fresh method for one projection (methods hold per-layer state: none shared)."""

    def get_linear_method(self, checkpoint_names: list[str]) -> W8A8LinearMethod | None:
        """checkpoint_names: the checkpoint modules a projection holds (q_proj, k_proj, v_proj for qkv_proj)."""
        ignored = [matches_any([n], self.ignore) for n in checkpoint_names]
        if any(ignored) and not all(ignored):
            raise ValueError(f"{checkpoint_names} are fused into one projection but only some are quantized")
        return None if ignored[0] else self.linear_method()
