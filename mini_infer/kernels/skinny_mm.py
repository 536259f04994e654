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
from mini_infer.kernels.pdl import pdl_launch, pdl_wait

MAX_ROWS = 16  # one row tile of the tensor-core instruction


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


INTERPRETER_CONFIG = SkinnyConfig(block_n=16, block_k=32, num_warps=1, num_stages=1)


@triton.jit
def _skinny_mm_kernel(
    x_ptr,
    w_ptr,
    sx_ptr,
    sw_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    SCALED: tl.constexpr,
    IS_INT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program: all (up to 16) rows x BLOCK_N outputs, walking K in BLOCK_K steps."""
    pdl_wait(USE_PDL)
    rows = tl.arange(0, 16)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = x_ptr + rows[:, None] * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    if IS_INT:
        acc = tl.zeros([16, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # padding rows / outputs past N only reach results that are never stored
            x = tl.load(x_ptrs + k0, mask=row_ok[:, None])
            w = tl.load(w_ptrs + k0, mask=col_ok[:, None])
        else:  # zero the K tail after the load: an 8-bit float load takes no `other`
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :])
            w = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :])
            x = tl.where(k_ok[None, :], x, tl.zeros_like(x))
            w = tl.where(k_ok[None, :], w, tl.zeros_like(w))
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
        sx = tl.load(sx_ptr + rows, mask=row_ok, other=0.0)
        sw = tl.load(sw_ptr + cols, mask=col_ok, other=0.0)
        out = out * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


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
    require_triton()
    m, k = x.shape
    n = w.shape[0]
    scaled = x_scale is not None
    if m > MAX_ROWS or w.shape[1] != k or scaled != (w_scale is not None):
        raise ValueError(f"skinny_mm takes at most {MAX_ROWS} rows, matching K, and both scales or neither")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w.stride(-1) != 1:
        raise ValueError("skinny_mm reads weights with a unit last stride")
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y
    config = config or (INTERPRETER_CONFIG if not x.is_cuda else SkinnyConfig())
    sx = x_scale.float().contiguous() if scaled else y
    sw = w_scale.float().contiguous() if scaled else y
    _skinny_mm_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        w,
        sx,
        sw,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        SCALED=scaled,
        IS_INT=w.dtype == torch.int8,
        HAS_BIAS=bias is not None,
        EVEN_K=k % config.block_k == 0,
        UPCAST_DOT=upcast_dot(x) and not scaled,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch(x, "skinny"),
    )
    return y
