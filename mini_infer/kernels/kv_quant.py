"""FP8 KV cache arithmetic: the one rounding rule the store applies and the one scaling the loads apply.

A float8_e4m3fn pool holds x / scale rounded to nearest even and saturated to ±448 (per-tensor scales:
one k_scale and one v_scale per layer, float32 scalars on the device). Attention reads a value back as
`(q.float() * scale)` rounded to the compute dtype, then computes as it does for a model-dtype cache. Any
other pool dtype stores and reads values as they are and ignores the scales.

The torch helpers are the references (and the CPU path); the Triton helpers compute the same float32
expressions: the quantization is act_quant.quantize_values (IEEE division, its own e4m3 rounding, since
Triton's interpreter casts to fp8 wrongly next to powers of two), so the cast after it is exact.
"""

import torch

from mini_infer.kernels._triton import tl, triton
from mini_infer.kernels.act_quant import quantize_ref, quantize_values

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def is_fp8_kv(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in e4m3 (nearest even, saturated to ±448)."""
    return quantize_ref(x, scale, FP8_KV_DTYPE)


def dequantize_kv_ref(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Values read from the pool in the compute dtype: e4m3 times its scale, anything else as it is."""
    if not is_fp8_kv(x):
        return x
    if scale is None:
        raise ValueError("an fp8 KV cache needs k_scale and v_scale (float32 tensors of one value)")
    return (x.float() * scale).to(dtype)


def kv_scale_args(
    k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale pointers a Triton kernel takes: required with an fp8 pool, a placeholder without."""
    if not is_fp8_kv(k_cache):
        return k_cache, k_cache  # never read
    if k_scale is None or v_scale is None:
        raise ValueError("an fp8 KV cache needs k_scale and v_scale (float32 tensors of one value)")
    for s in (k_scale, v_scale):
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != k_cache.device:
            raise ValueError(f"KV scales must be one float32 value on {k_cache.device}, got {s.dtype} {tuple(s.shape)}")
    return k_scale, v_scale


@triton.jit
def quantize_kv(x, scale):
    """quantize_kv_ref in Triton: e4m3 values of x (any float dtype) / scale."""
    return quantize_values(x.to(tl.float32), scale, 448.0, False).to(tl.float8e4nv)


@triton.jit
def dequantize_kv(x, scale, dtype: tl.constexpr):
    """dequantize_kv_ref in Triton for an e4m3 tile: float32 product, rounded once to dtype."""
    return (x.to(tl.float32) * scale).to(dtype)
