"""RMSNorm and fused residual-add + RMSNorm, each also with its output quantized per token to 8 bits.

The reference computes in float32 and casts back, exactly as Hugging Face's LlamaRMSNorm does. The `_quant`
variants feed a W8A8 projection (quantization/fused_act_quant.py): the norm's output, rounded to its dtype
as it would be stored, goes through act_quant's rule in the same kernel, and only the 8-bit values and the
scales are written.
"""

import torch
import torch.nn.functional as F

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton
from mini_infer.kernels.act_quant import (
    QuantizedActivation,
    check_quant_dtype,
    quant_scale,
    quantize_activation,
    quantize_values,
)
from mini_infer.kernels.pdl import pdl_launch, pdl_wait


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight over the last dimension."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place); returns rms_norm(residual)."""
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch set's RMSNorm: on a CPU in float32, torch's own F.rms_norm, one op for the reference's six
    and bit-identical to it there (tests/test_cpu_path.py); elsewhere the reference (in bfloat16 F.rms_norm
    skips the rounding before the weight)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fused_add_rms_norm_ref through rms_norm_torch."""
    residual.add_(x)
    return rms_norm_torch(residual, weight, eps)


def rms_norm_quant_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> QuantizedActivation:
    """rms_norm_ref's output quantized per token to `dtype` by act_quant_ref: the fused kernel's oracle."""
    return quantize_activation(rms_norm_ref(x, weight, eps), dtype)


def fused_add_rms_norm_quant_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
) -> QuantizedActivation:
    """fused_add_rms_norm_ref (residual += x in place), then act_quant_ref: the fused kernel's oracle."""
    return quantize_activation(fused_add_rms_norm_ref(x, residual, weight, eps), dtype)


def rms_norm_quant_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> QuantizedActivation:
    """The torch set's: rms_norm_torch, then act_quant_ref, the two steps of the unfused CPU path."""
    return quantize_activation(rms_norm_torch(x, weight, eps), dtype)


def fused_add_rms_norm_quant_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
) -> QuantizedActivation:
    """fused_add_rms_norm_torch (residual += x in place), then act_quant_ref."""
    return quantize_activation(fused_add_rms_norm_torch(x, residual, weight, eps), dtype)


# ---------------------------------------------------------------------------------------------------
# Triton: one program per row; the row stays in registers between the add, the reduction and the
# scale, so fused add+RMSNorm reads x and residual once and writes residual and out once.


@triton.jit
def _norm_row(
    x_ptr,
    residual_ptr,
    weight_ptr,
    row,
    x_row_stride,
    residual_row_stride,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_TO_ROW: tl.constexpr,
):
    """One row's (residual += x, stored, then) RMSNorm times the weight, in float32 and, with ROUND_TO_ROW,
    rounded to the row's dtype first (the output's dtype when the weight's is no wider)."""
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * x_row_stride + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + row * residual_row_stride + offs
        residual = tl.load(residual_ptrs, mask=mask, other=0.0)
        x = (residual.to(tl.float32) + x.to(tl.float32)).to(residual.dtype)
        tl.store(residual_ptrs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)  # the reference rounds before the weight
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = normed * weight
    if ROUND_TO_ROW:
        out = out.to(x.dtype).to(tl.float32)
    return out


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    out = _norm_row(
        x_ptr, residual_ptr, weight_ptr, row, x_row_stride, residual_row_stride, eps, HIDDEN, BLOCK, HAS_RESIDUAL, False
    )
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * out_row_stride + offs, out.to(out_ptr.dtype.element_ty), mask=offs < HIDDEN)


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    q_ptr,
    s_ptr,
    x_row_stride,
    residual_row_stride,
    q_row_stride,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_TO_ROW: tl.constexpr,
    QMAX: tl.constexpr,
    IS_INT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The norm's output as _rms_norm_kernel would store it (rounded to its dtype), then act_quant's two
    steps on it while the row is still in registers: the scale from its amax, the 8-bit values."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    out = _norm_row(
        x_ptr,
        residual_ptr,
        weight_ptr,
        row,
        x_row_stride,
        residual_row_stride,
        eps,
        HIDDEN,
        BLOCK,
        HAS_RESIDUAL,
        ROUND_TO_ROW,
    )
    scale = quant_scale(tl.max(tl.abs(out), axis=0), QMAX)  # masked lanes are 0
    tl.store(s_ptr + row, scale)
    offs = tl.arange(0, BLOCK)
    q = quantize_values(out, scale, QMAX, IS_INT)
    tl.store(q_ptr + row * q_row_stride + offs, q.to(q_ptr.dtype.element_ty), mask=offs < HIDDEN)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] as [rows, H] with a unit last stride (a view where possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    num_warps: int | None = None,
    quant_dtype: torch.dtype | None = None,
) -> torch.Tensor | QuantizedActivation:
    """The norm's output in its dtype, or with quant_dtype its QuantizedActivation (no model-dtype copy)."""
    require_triton()
    hidden = x.shape[-1]
    x_rows = _rows(x)
    row_dtype = residual.dtype if residual is not None else x.dtype
    out_dtype = torch.promote_types(row_dtype, weight.dtype)
    residual_rows = residual.view(-1, hidden) if residual is not None else x_rows
    if residual is not None and residual_rows.stride(-1) != 1:
        raise ValueError("fused_add_rms_norm_triton writes residual in place: it needs a unit last stride")
    block = next_pow2(hidden)
    if num_warps is None:
        num_warps = min(16, max(1, block // 512))
    rows = x_rows.shape[0]
    common = dict(HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps)
    if quant_dtype is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        out_rows = out.view(-1, hidden)
        if rows > 0:
            _rms_norm_kernel[(rows,)](
                x_rows,
                residual_rows,
                weight,
                out_rows,
                x_rows.stride(0),
                residual_rows.stride(0),
                out_rows.stride(0),
                eps,
                **common,
                **pdl_launch(x_rows, "norm"),
            )
        return out
    qmax = check_quant_dtype(quant_dtype)
    q = torch.empty(x.shape, dtype=quant_dtype, device=x.device)
    scales = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    if rows > 0:
        _rms_norm_quant_kernel[(rows,)](
            x_rows,
            residual_rows,
            weight,
            q,
            scales,
            x_rows.stride(0),
            residual_rows.stride(0),
            hidden,
            eps,
            ROUND_TO_ROW=out_dtype == row_dtype,
            QMAX=qmax,
            IS_INT=quant_dtype == torch.int8,
            **common,
            **pdl_launch(x_rows, "norm"),
        )
    return QuantizedActivation(q, scales, out_dtype)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton rms_norm_ref: same rounding steps, one pass over x."""
    return _launch_rms_norm(x, None, weight, eps)


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Triton fused_add_rms_norm_ref: residual += x in place; returns rms_norm(residual)."""
    return _launch_rms_norm(x, residual, weight, eps)


def rms_norm_quant_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> QuantizedActivation:
    """rms_norm_triton's output quantized per token to `dtype` in the same launch: the bits of act_quant_ref
    applied to rms_norm_triton(x, weight, eps), without that tensor ever being written."""
    return _launch_rms_norm(x, None, weight, eps, quant_dtype=dtype)


def fused_add_rms_norm_quant_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
) -> QuantizedActivation:
    """fused_add_rms_norm_triton (residual += x in place, in its dtype) with the output quantized per token."""
    return _launch_rms_norm(x, residual, weight, eps, quant_dtype=dtype)
