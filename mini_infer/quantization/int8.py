"""INT8 online (`quantization="int8"`): weights per output channel, activations per token, both amax / 127,
round half to even, clamp +-127 (the compressed-tensors `int-quantized` W8A8 scheme, computed at load)."""

from __future__ import annotations

import torch

from mini_infer.quantization.base import QuantizationConfig
from mini_infer.quantization.w8a8 import W8A8LinearMethod


class Int8Config(QuantizationConfig):
    name = "int8"
    online = True

    def __init__(self) -> None:
        self.ignore: list[str] = []

    def linear_method(self) -> W8A8LinearMethod:
        return W8A8LinearMethod(torch.int8, online=True)
