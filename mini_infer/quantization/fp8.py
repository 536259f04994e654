"""FP8 (float8_e4m3fn): online `quantization="fp8"`, and HF `quant_method: "fp8"` checkpoints.

Online: per-output-channel weight scales amax / 448, per-token activation scales (amax / 448).
Checkpoints (Qwen3-FP8, DeepSeek-V3): `weight` in e4m3 with `weight_scale_inv` per `weight_block_size`
block (128 x 128), activations scaled per token and group of 128 columns (`activation_scheme: dynamic`).
"""

from __future__ import annotations

import torch

from mini_infer.quantization.base import QuantizationConfig
from mini_infer.quantization.w8a8 import W8A8LinearMethod


class Fp8Config(QuantizationConfig):
    name = "fp8"

    def __init__(self, block: tuple[int, int] | None = None, ignore: list[str] | None = None) -> None:
        self.block, self.ignore = block, list(ignore or [])
        self.online = block is None

    @classmethod
    def from_checkpoint(cls, qc: dict) -> Fp8Config:
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise ValueError(f"FP8 checkpoints with activation_scheme={qc['activation_scheme']!r}: only 'dynamic'")
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"FP8 checkpoints in fmt={fmt!r}: only 'e4m3' is supported")
        block = qc.get("weight_block_size")
        if block is None:
            raise ValueError("FP8 checkpoints with per-tensor scales are not supported: only weight_block_size")
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise ValueError(f"weight_block_size must be two positive integers, got {block!r}")
        ignore = list(qc.get("ignored_layers") or []) + list(qc.get("modules_to_not_convert") or [])
        return cls(block=(block[0], block[1]), ignore=ignore)

    def linear_method(self) -> W8A8LinearMethod:
        if self.block is None:
            return W8A8LinearMethod(torch.float8_e4m3fn, online=True)
        return W8A8LinearMethod(torch.float8_e4m3fn, online=False, block=self.block, scale_name="weight_scale_inv")
