"""SiLU-and-mul on the fused gate_up projection output; also with its output quantized per token to 8 bits,
for a W8A8 down projection (quantization/fused_act_quant.py)."""

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


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] holding gate then up; returns silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_quant_ref(x: torch.Tensor, dtype: torch.dtype) -> QuantizedActivation:
    """silu_and_mul_ref's output quantized per token by act_quant_ref: the torch set's and the oracle."""
    return quantize_activation(silu_and_mul_ref(x), dtype)


# ---------------------------------------------------------------------------------------------------
# Triton: a 2-D grid of (token, column block); gate and up are read once, the product written once.


@triton.jit
def _silu_and_mul_block(x_row, offs, mask, INTERMEDIATE: tl.constexpr):
    """silu(gate) * up of one row's columns `offs`, in x's dtype as the reference rounds it."""
    gate = tl.load(x_row + offs, mask=mask, other=0.0)
    up = tl.load(x_row + INTERMEDIATE + offs, mask=mask, other=0.0)
    gate_f = gate.to(tl.float32)
    silu = (gate_f * tl.sigmoid(gate_f)).to(gate.dtype)  # the reference rounds silu(gate) first
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    x_row_stride,
    out_row_stride,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTERMEDIATE
    out = _silu_and_mul_block(x_ptr + row * x_row_stride, offs, mask, INTERMEDIATE)
    tl.store(out_ptr + row * out_row_stride + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    x_row_stride,
    q_row_stride,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
    QMAX: tl.constexpr,
    IS_INT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per token: the row's amax over its SiLU-and-mul values, then the values again, quantized
    (the scale needs the whole row first). A row that fits one BLOCK is computed once and kept in
    registers; a longer one is recomputed in the second pass, from gate/up reads the first one left in L2."""
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    q_row = q_ptr + row * q_row_stride
    offs = tl.arange(0, BLOCK)
    if INTERMEDIATE <= BLOCK:
        mask = offs < INTERMEDIATE
        y = _silu_and_mul_block(x_row, offs, mask, INTERMEDIATE).to(tl.float32)
        scale = quant_scale(tl.max(tl.abs(y), axis=0), QMAX)  # masked lanes are 0
        tl.store(q_row + offs, quantize_values(y, scale, QMAX, IS_INT).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, INTERMEDIATE, BLOCK):
            cols = start + offs
            y = _silu_and_mul_block(x_row, cols, cols < INTERMEDIATE, INTERMEDIATE).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(y))
        scale = quant_scale(tl.max(amax, axis=0), QMAX)
        for start in range(0, INTERMEDIATE, BLOCK):
            cols = start + offs
            mask = cols < INTERMEDIATE
            y = _silu_and_mul_block(x_row, cols, mask, INTERMEDIATE).to(tl.float32)
            tl.store(q_row + cols, quantize_values(y, scale, QMAX, IS_INT).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def silu_and_mul_triton(x: torch.Tensor, *, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """Triton silu_and_mul_ref: x [..., 2 * I] (gate then up) -> [..., I]. block/num_warps: tuning."""
    require_triton()
    intermediate = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((*x.shape[:-1], intermediate), dtype=x.dtype, device=x.device)
    out_rows = out.view(-1, intermediate)
    if rows.shape[0] == 0:
        return out
    block = min(block, next_pow2(intermediate))
    grid = (rows.shape[0], triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](
        rows,
        out_rows,
        rows.stride(0),
        out_rows.stride(0),
        INTERMEDIATE=intermediate,
        BLOCK=block,
        num_warps=num_warps,
        **pdl_launch(rows, "silu"),
    )
    return out


def silu_and_mul_quant_triton(
    x: torch.Tensor, dtype: torch.dtype, *, block: int | None = None, num_warps: int | None = None
) -> QuantizedActivation:
    """silu_and_mul_triton's output quantized per token to `dtype` in the same launch (one program per
    token): the bits of act_quant_ref applied to silu_and_mul_triton(x). block / num_warps: tuning (by
    default the whole row in one block up to 8192 columns, else two passes of 8192; untuned)."""
    require_triton()
    qmax = check_quant_dtype(dtype)
    intermediate = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q = torch.empty((*x.shape[:-1], intermediate), dtype=dtype, device=x.device)
    scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if rows.shape[0] == 0:
        return QuantizedActivation(q, scales, x.dtype)
    block = block or min(next_pow2(intermediate), 8192 if x.is_cuda else 128)
    if num_warps is None:
        num_warps = min(16, max(4, block // 512))
    _silu_and_mul_quant_kernel[(rows.shape[0],)](
        rows,
        q,
        scales,
        rows.stride(0),
        intermediate,
        INTERMEDIATE=intermediate,
        BLOCK=block,
        QMAX=qmax,
        IS_INT=dtype == torch.int8,
        num_warps=num_warps,
        **pdl_launch(rows, "silu"),
    )
    return QuantizedActivation(q, scales, x.dtype)
