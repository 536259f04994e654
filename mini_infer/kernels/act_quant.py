"""Dynamic activation quantization: each token's row (or each group of `group_size` columns of it) scaled
by its own amax into 8 bits, right before an 8-bit GEMM.

fp8 (float8_e4m3fn): scale = amax / 448, q = cast(x / scale) (round to nearest even, |x / scale| <= 448).
int8: scale = amax / 127, q = round_half_even(x / scale) clamped to +-127. A zero row gets a tiny scale
and quantizes to zeros. The reference `act_quant_ref` is the CPU path and the oracle of the Triton kernel,
which computes the same float32 expressions in the same order (a two-pass loop per row: amax, then cast).
The kernels divide with `div_rn` (IEEE, round to nearest), the scale as well as the values: Triton's `/` is
an approximate division on the GPU and moved int8 values on rounding ties by one step (26 in 151,552 on an
H200). `quant_scale` and `quantize_values` are the two steps every Triton quantizer shares (this kernel, the
W8A8 GEMV's own, the fused norm and SiLU ones), so they all give act_quant_ref's bits.

`QuantizedActivation` is an activation already in 8 bits, as the op before a W8A8 projection emits it when
it is fused with the quantization (quantization/fused_act_quant.py).
"""

from typing import NamedTuple

import torch

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton

MIN_AMAX = 1e-10  # a row of zeros: no division by zero, its values stay zero
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
_ROUND = 12582912.0  # 1.5 * 2**23: (y + R) - R rounds |y| < 2**22 to the nearest integer, ties to even


class QuantizedActivation(NamedTuple):
    """values [..., K] (float8_e4m3fn or int8) and scales [..., 1] (float32, one per token) of an activation
    whose own dtype is `dtype`: the dtype the projection that reads it returns."""

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype


def check_quant_dtype(dtype: torch.dtype) -> float:
    if dtype not in QMAX:
        raise ValueError(f"8-bit quantization stores float8_e4m3fn or int8, not {dtype}")
    return QMAX[dtype]


def quantize_ref(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale in 8 bits (scale broadcasts against x): the one rounding rule weights and activations share."""
    qmax = check_quant_dtype(dtype)
    y = (x.float() / scale).clamp(-qmax, qmax)
    return (torch.round(y) if dtype == torch.int8 else y).to(dtype)


def act_quant_ref(
    x: torch.Tensor, dtype: torch.dtype, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] in `dtype`, scales [M, 1] or [M, K / group_size] float32)."""
    qmax = check_quant_dtype(dtype)
    m, k = x.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"{k} features are not a whole number of quantization groups of {g}")
    xg = x.float().view(m, k // g, g)
    amax = xg.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_AMAX)
    # a tensor divisor: on CUDA torch turns division by a Python number into a product with its reciprocal,
    # which is not the IEEE quotient the kernels (and the CPU) compute
    scale = amax / amax.new_tensor(qmax)
    q = quantize_ref(xg, scale, dtype)
    return q.view(m, k), scale.view(m, k // g)


def quantize_activation(x: torch.Tensor, dtype: torch.dtype) -> QuantizedActivation:
    """act_quant_ref per token of x [..., K]."""
    q, scale = act_quant_ref(x.reshape(-1, x.shape[-1]), dtype)
    return QuantizedActivation(q.view(x.shape), scale.view(*x.shape[:-1], 1), x.dtype)


@triton.jit
def quant_scale(amax, QMAX: tl.constexpr):
    """act_quant_ref's scale of a row (or group) whose largest |value| is amax: max(amax, MIN_AMAX) / qmax."""
    return tl.math.div_rn(tl.maximum(amax, 1e-10), QMAX)


@triton.jit
def _round_to_e4m3(y):
    """y (|y| <= 448) rounded to the nearest e4m3 value, ties to even, in float32: the cast after it is
    exact. Triton's interpreter casts float32 to fp8 wrongly next to powers of two (125.6 -> 64), so the
    kernel rounds itself, the same on the GPU and the CPU."""
    exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp_bits = (tl.maximum(exponent, -6) - 3 + 127) << 23  # 3 mantissa bits; subnormals below 2**-6
    ulp = ulp_bits.to(tl.float32, bitcast=True)
    return ((y / ulp + 12582912.0) - 12582912.0) * ulp


@triton.jit
def quantize_values(x, scale, QMAX: tl.constexpr, IS_INT: tl.constexpr):
    """float32 values of quantize_ref(x, scale): x / scale clamped to +-QMAX, rounded to int or e4m3."""
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    if IS_INT:
        y = (y + 12582912.0) - 12582912.0
    else:
        y = _round_to_e4m3(y)
    return y


@triton.jit
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    stride_x,
    stride_q,
    GROUP,
    NUM_GROUPS,
    QMAX: tl.constexpr,
    IS_INT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    grp = tl.program_id(1)
    start = grp * GROUP
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, GROUP, BLOCK):
        cols = start + off + offs
        x = tl.load(x_ptr + row * stride_x + cols, mask=off + offs < GROUP, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = quant_scale(tl.max(amax, axis=0), QMAX)
    tl.store(s_ptr + row * NUM_GROUPS + grp, scale)
    for off in range(0, GROUP, BLOCK):
        cols = start + off + offs
        mask = off + offs < GROUP
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = quantize_values(x, scale, QMAX, IS_INT)
        tl.store(q_ptr + row * stride_q + cols, y.to(q_ptr.dtype.element_ty), mask=mask)


def act_quant_triton(
    x: torch.Tensor, dtype: torch.dtype, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as act_quant_ref, in one kernel launch (one program per token and group)."""
    require_triton()
    qmax = check_quant_dtype(dtype)
    m, k = x.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"{k} features are not a whole number of quantization groups of {g}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=dtype, device=x.device)
    scale = torch.empty(m, k // g, dtype=torch.float32, device=x.device)
    if m:
        block = min(next_pow2(g), 1024 if x.is_cuda else 128)
        _act_quant_kernel[(m, k // g)](
            x, q, scale, x.stride(0), q.stride(0), g, k // g, QMAX=qmax, IS_INT=dtype == torch.int8, BLOCK=block
        )
    return q, scale
