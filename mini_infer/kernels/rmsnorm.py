"""RMSNorm and fused residual-add + RMSNorm.

The reference computes in float32 and casts back, exactly as Hugging Face's LlamaRMSNorm does.
"""

import torch
import torch.nn.functional as F

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton


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


# ---------------------------------------------------------------------------------------------------
# Triton: one program per row; the row stays in registers between the add, the reduction and the
# scale, so fused add+RMSNorm reads x and residual once and writes residual and out once.


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
):
    row = tl.program_id(0).to(tl.int64)
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
    tl.store(out_ptr + row * out_row_stride + offs, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


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
) -> torch.Tensor:
    require_triton()
    hidden = x.shape[-1]
    x_rows = _rows(x)
    row_dtype = residual.dtype if residual is not None else x.dtype
    out = torch.empty(x.shape, dtype=torch.promote_types(row_dtype, weight.dtype), device=x.device)
    out_rows = out.view(-1, hidden)
    residual_rows = residual.view(-1, hidden) if residual is not None else x_rows
    if residual is not None and residual_rows.stride(-1) != 1:
        raise ValueError("fused_add_rms_norm_triton writes residual in place: it needs a unit last stride")
    block = next_pow2(hidden)
    if num_warps is None:
        num_warps = min(16, max(1, block // 512))
    if x_rows.shape[0] > 0:
        _rms_norm_kernel[(x_rows.shape[0],)](
            x_rows,
            residual_rows,
            weight,
            out_rows,
            x_rows.stride(0),
            residual_rows.stride(0),
            out_rows.stride(0),
            eps,
            HIDDEN=hidden,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=num_warps,
        )
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton rms_norm_ref: same rounding steps, one pass over x."""
    return _launch_rms_norm(x, None, weight, eps)


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Triton fused_add_rms_norm_ref: residual += x in place; returns rms_norm(residual)."""
    return _launch_rms_norm(x, residual, weight, eps)
