"""SiLU-and-mul on the fused gate_up projection output."""

import torch
import torch.nn.functional as F

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] holding gate then up; returns silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------
# Triton: a 2-D grid of (token, column block); gate and up are read once, the product written once.


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    x_row_stride,
    out_row_stride,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTERMEDIATE
    gate = tl.load(x_ptr + row * x_row_stride + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_row_stride + INTERMEDIATE + offs, mask=mask, other=0.0)
    gate_f = gate.to(tl.float32)
    silu = (gate_f * tl.sigmoid(gate_f)).to(gate.dtype)  # the reference rounds silu(gate) first
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


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
    )
    return out
