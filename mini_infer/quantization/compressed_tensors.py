"""compressed-tensors checkpoints (llm-compressor's format; RedHatAI's FP8-dynamic and W8A8 models).

Supported: one config group targeting `Linear`, `format` "float-quantized" (e4m3) or "int-quantized"
(int8), weights 8-bit symmetric per `channel` (`weight` + `weight_scale` [out, 1]), input activations
8-bit symmetric `dynamic` per `token`, an `ignore` list (names or `re:` patterns; lm_head is never
quantized here), and a static per-tensor fp8 `kv_cache_scheme` (its k_scale / v_scale load into the
attention layers, quantization/kv_cache.py, and take effect with kv_cache_dtype="fp8"). Anything else
(static or weight-only schemes, groups, other KV schemes) is a ValueError naming the field, never a silent
misread.
"""

from __future__ import annotations

import torch

from mini_infer.quantization.base import QuantizationConfig
from mini_infer.quantization.kv_cache import check_kv_cache_scheme
from mini_infer.quantization.w8a8 import W8A8LinearMethod

_FORMATS = {"float-quantized": ("float", torch.float8_e4m3fn), "int-quantized": ("int", torch.int8)}


def _check(scheme: dict | None, what: str, expect: dict) -> None:
    if scheme is None:
        raise ValueError(f"compressed-tensors: {what} are not quantized (weight-only schemes are not supported)")
    for key, value in expect.items():
        if scheme.get(key) != value:
            raise ValueError(f"compressed-tensors: {what} {key}={scheme.get(key)!r}, only {value!r} is supported")


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"
    online = False

    def __init__(self, dtype: torch.dtype, ignore: list[str]) -> None:
        self.dtype, self.ignore = dtype, ignore

    @classmethod
    def from_checkpoint(cls, qc: dict) -> CompressedTensorsConfig:
        fmt = qc.get("format")
        if fmt not in _FORMATS:
            raise ValueError(f"compressed-tensors format {fmt!r} is not supported: only {sorted(_FORMATS)}")
        kind, dtype = _FORMATS[fmt]
        if qc.get("kv_cache_scheme"):
            check_kv_cache_scheme(qc["kv_cache_scheme"])
        groups = list((qc.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors: exactly one config group is supported, got {len(groups)}")
        group = groups[0]
        if "Linear" not in (group.get("targets") or []):
            raise ValueError(f"compressed-tensors targets {group.get('targets')!r}: only ['Linear']")
        _check(group.get("weights"), "weights", dict(num_bits=8, type=kind, symmetric=True, strategy="channel"))
        if group["weights"].get("dynamic"):
            raise ValueError("compressed-tensors: dynamic weights are not supported")
        _check(
            group.get("input_activations"),
            "input activations",
            dict(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True),
        )
        return cls(dtype, list(qc.get("ignore") or []))

    def linear_method(self) -> W8A8LinearMethod:
        return W8A8LinearMethod(self.dtype, online=False)
