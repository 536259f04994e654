"""Few-row matrix products on the tensor cores: x [M <= 16, K] @ w [N, K]^T for decode at small batch.

A decode step at batch 1-8 is weight-bound: the cost is reading each weight once. The plain GEMV
(kernels/gemv.py) issues ordinary loads, and Triton software-pipelines only the operands of `tl.dot`
(asynchronous copies, several stages in flight), so a GEMV written as a dot with the rows padded to 16
keeps more bytes in flight per SM. The padding rows are masked loads whose results are never stored;
they cost tensor-core cycles the weight stream leaves idle anyway.

One kernel serves the model dtype and 8-bit weights:
- bf16 / fp16 / fp32: y = x @ w^T in float32, rounded once (as cuBLAS does).
- W8A8 with channel scales (x already quantized per token, kernels/act_quant.py): int8 accumulates in
  int32 (exact), fp8 in float32, then y = acc * sx[m] * sw[n]: the arithmetic of scaled_mm.w8a8_mm_ref up
  to summation order.
Which kernel and tile a shape gets on a GPU is measured, not guessed: kernels/gemv_table.py.
"""

from dataclasses import dataclass

import torch

from mini_infer.kernels._triton import dot_precision, require_triton, tl, triton, upcast_dot
from mini_infer.kernels.act_quant import check_quant_dtype, quantize_values

MAX_ROWS = 16  # one row tile of the tensor-core instruction


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


INTERPRETER_CONFIG = SkinnyConfig(block_n=16, block_k=32, num_warps=1, num_stages=1)


@triton.jit
def _prologue_tile(
    x_ptr,
    r_ptr,
    g_ptr,
    rows,
    ks,
    mask,
    stride_x,
    stride_r,
    inv_rms,
    K,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    SILU: tl.constexpr,
):
    """One [16, BLOCK_K] tile of the product's input, in the model dtype, computed from what the op before
    it would have read: x (+ the residual), RMSNorm'd with inv_rms, or SiLU(gate) * up of a gate_up row.
    The rounding steps are those of kernels/rmsnorm.py and kernels/activation.py."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
    if SILU:  # x_ptr rows hold gate then up, K features each
        up = tl.load(x_ptr + rows[:, None] * stride_x + K + ks[None, :], mask=mask, other=0.0)
        gate = x.to(tl.float32)
        x = ((gate * tl.sigmoid(gate)).to(x.dtype).to(tl.float32) * up.to(tl.float32)).to(x.dtype)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_r + ks[None, :], mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(r.dtype)
    if NORM:
        g = tl.load(g_ptr + ks, mask=ks < K, other=0.0)
        normed = (x.to(tl.float32) * inv_rms[:, None]).to(x.dtype)
        x = (normed.to(tl.float32) * g.to(tl.float32)[None, :]).to(x.dtype)
    return x


@triton.jit
def _skinny_mm_kernel(
    x_ptr,
    w_ptr,
    sx_ptr,
    sw_ptr,
    b_ptr,
    y_ptr,
    r_ptr,
    r_out_ptr,
    g_ptr,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    stride_r,
    eps,
    SCALED: tl.constexpr,
    QUANT_X: tl.constexpr,
    QMAX: tl.constexpr,
    IS_INT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    SILU: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: all (up to 16) rows x BLOCK_N outputs, walking K in BLOCK_K steps.

    A prologue (HAS_RESIDUAL / NORM / SILU / QUANT_X) rebuilds the input from the previous op's inputs, so
    that op needs no launch of its own: every program reads the whole of x anyway, a few KB from L2. Row
    statistics come first, in passes over x: the RMS (NORM), then each row's amax (QUANT_X); program 0
    writes the residual sum (HAS_RESIDUAL) to r_out, never over r, which the other programs still read."""
    rows = tl.arange(0, 16)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    inv_rms = tl.zeros([16], dtype=tl.float32)
    if NORM:
        sumsq = tl.zeros([16, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            mask = row_ok[:, None] & (ks < K)[None, :]
            x = _prologue_tile(x_ptr, r_ptr, g_ptr, rows, ks, mask, stride_x, stride_r, inv_rms, K,
                               HAS_RESIDUAL, False, SILU)  # fmt: skip
            if HAS_RESIDUAL:
                if tl.program_id(0) == 0:
                    tl.store(r_out_ptr + rows[:, None] * stride_r + ks[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            sumsq += xf * xf
        inv_rms = tl.rsqrt(tl.sum(sumsq, axis=1) / K + eps)
    sx = tl.zeros([16], dtype=tl.float32)
    if QUANT_X:
        amax = tl.zeros([16, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            mask = row_ok[:, None] & (ks < K)[None, :]
            x = _prologue_tile(x_ptr, r_ptr, g_ptr, rows, ks, mask, stride_x, stride_r, inv_rms, K,
                               HAS_RESIDUAL, NORM, SILU)  # fmt: skip
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        sx = tl.maximum(tl.max(amax, axis=1), 1e-10) / QMAX
    elif SCALED:
        sx = tl.load(sx_ptr + rows, mask=row_ok, other=0.0)
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    if IS_INT:
        acc = tl.zeros([16, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        if QUANT_X or HAS_RESIDUAL or NORM or SILU:
            x = _prologue_tile(x_ptr, r_ptr, g_ptr, rows, ks, row_ok[:, None] & (ks < K)[None, :], stride_x,
                               stride_r, inv_rms, K, HAS_RESIDUAL, NORM, SILU)  # fmt: skip
            if QUANT_X:
                x = quantize_values(x.to(tl.float32), sx[:, None], QMAX, IS_INT).to(w_ptr.dtype.element_ty)
            if not NORM and HAS_RESIDUAL:
                if tl.program_id(0) == 0:
                    tl.store(
                        r_out_ptr + rows[:, None] * stride_r + ks[None, :], x, mask=row_ok[:, None] & (ks < K)[None, :]
                    )
        elif EVEN_K:  # padding rows / outputs past N only reach results that are never stored
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None])
        else:  # zero the K tail after the load: an 8-bit float load takes no `other`
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :])
            x = tl.where((ks < K)[None, :], x, tl.zeros_like(x))
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=col_ok[:, None])
        else:
            w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & (ks < K)[None, :])
            w = tl.where((ks < K)[None, :], w, tl.zeros_like(w))
        if UPCAST_DOT:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IS_INT:
            acc += tl.dot(x, tl.trans(w), out_dtype=tl.int32)
        elif SCALED:
            acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    out = acc.to(tl.float32)
    if SCALED:
        sw = tl.load(sw_ptr + cols, mask=col_ok, other=0.0)
        out = out * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch(x, w, bias, x_scale, w_scale, out_dtype, config, residual=None, norm=None, silu=False, quant=False):
    require_triton()
    m = x.shape[0]
    k = x.shape[1] // 2 if silu else x.shape[1]
    n = w.shape[0]
    if m > MAX_ROWS or w.shape[1] != k:
        raise ValueError(f"skinny_mm takes at most {MAX_ROWS} rows and weights with the input's K ({k})")
    if (w_scale is None) != (w.dtype.itemsize > 1) or (x_scale is not None and quant):
        raise ValueError("8-bit weights need w_scale, and x_scale when x is already quantized (else not)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w.stride(-1) != 1:
        raise ValueError("skinny_mm reads weights with a unit last stride")
    y = torch.empty(m, n, dtype=out_dtype or (x.dtype if w_scale is None or quant else torch.bfloat16), device=x.device)
    r_out = torch.empty_like(residual) if residual is not None else None
    if m == 0:
        return y, r_out
    config = config or (INTERPRETER_CONFIG if not x.is_cuda else SkinnyConfig())
    scaled = w_scale is not None
    _skinny_mm_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        w,
        x_scale.float().contiguous() if x_scale is not None else y,
        w_scale.float().contiguous() if scaled else y,
        bias if bias is not None else y,
        y,
        residual if residual is not None else y,
        r_out if r_out is not None else y,
        norm[0] if norm is not None else y,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        residual.stride(0) if residual is not None else 0,
        float(norm[1]) if norm is not None else 0.0,
        SCALED=scaled,
        QUANT_X=quant,
        QMAX=check_quant_dtype(w.dtype) if scaled else 1.0,
        IS_INT=w.dtype == torch.int8,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        NORM=norm is not None,
        SILU=silu,
        EVEN_K=k % config.block_k == 0,
        UPCAST_DOT=upcast_dot(x) and not scaled,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y, r_out


def skinny_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """x [M <= 16, K] @ w [N, K]^T (+ bias) in out_dtype (default x's). With x_scale [M, 1] and w_scale
    [N, 1], x and w are 8-bit (int8 or float8_e4m3fn) and the product is rescaled per token and channel."""
    if (x_scale is None) != (w_scale is None):
        raise ValueError("skinny_mm takes both scales or neither")
    return _launch(x, w, bias, x_scale, w_scale, out_dtype, config)[0]


def skinny_mm_fused(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    w_scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    silu: bool = False,
    config: SkinnyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The product of the op before it and this linear, in one launch; x is in the model dtype.

    residual: the input is residual + x (kernels/rmsnorm.py's fused add), and the sum comes back as a new
    tensor (the residual stream's next value). norm (weight, eps): RMSNorm of that. silu: x is a gate_up
    row [M, 2K] and the input is SiLU(gate) * up. w_scale: w is 8-bit and each input row is quantized to
    it per token (kernels/act_quant.py's rule) before the product. Returns (y, residual sum or None)."""
    return _launch(x, w, bias, None, w_scale, None, config, residual, norm, silu, quant=w_scale is not None)
