"""W8A8 matrix products: 8-bit activations times 8-bit weights, rescaled to the model dtype.

Two scale layouts:
- channel: x_scale [M, 1] (per token), w_scale [N, 1] (per output channel): y = (xq @ wq^T) * sx * sw^T.
- block: x_scale [M, K / gk] (per token and group of gk columns), w_scale [ceil(N / bn), K / gk] (per
  bn x gk weight block, DeepSeek-V3 / Qwen3-FP8's `weight_scale_inv`): each K group's partial product is
  rescaled by its two scales before the sum.

`w8a8_mm_ref` dequantizes both operands to float32 and multiplies: the CPU path and the oracle. On CUDA
`w8a8_mm` picks, per call shape: the Triton GEMV below for up to GEMV_ROWS rows (it reads each 8-bit weight
once, where cuBLAS tiles are weak), `torch._scaled_mm` for fp8 channel scales (Hopper/Ada), `torch._int_mm`
for int8 (more than 16 rows), and the Triton kernel (row blocks of GEMV_ROWS) for anything else, e.g.
block scales at prefill (correct, not tuned: it reads the weight once per 8 rows).
"""

import functools

import torch

from mini_infer.kernels._triton import require_triton, tl, triton

GEMV_ROWS = 8  # rows per program of the Triton kernel; up to this many rows w8a8_mm takes it on CUDA


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 values of an 8-bit matrix: scale [rows, 1] per row, or one per (block[0] x block[1]) tile."""
    if block is None:
        return q.float() * scale.float()
    bn, bk = block
    s = scale.float().repeat_interleave(bn, 0)[: q.shape[0]].repeat_interleave(bk, 1)[:, : q.shape[1]]
    return q.float() * s


def w8a8_mm_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(dequantized x) @ (dequantized w)^T in float32 (+ bias), cast to out_dtype."""
    group = None if block is None else (1, block[1])
    y = dequantize_ref(xq, x_scale, group) @ dequantize_ref(wq, w_scale, block).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@triton.jit
def _w8a8_gemv_kernel(
    x_ptr,
    sx_ptr,
    w_ptr,
    sw_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    stride_sx,
    stride_sw,
    HAS_BIAS: tl.constexpr,
    BLOCKWISE: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """BLOCK_M rows x BLOCK_N outputs per program, walking K in BLOCK_K steps of 8-bit loads. Blockwise,
    BLOCK_K is the K group, and each step's partial sums are rescaled by their group's scales."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        x_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = col_ok[:, None] & k_ok[None, :]
        # masked lanes are zeroed after the load: an fp8 load takes no `other`
        x = tl.where(x_mask, tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=x_mask).to(tl.float32), 0.0)
        w = tl.where(w_mask, tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=w_mask).to(tl.float32), 0.0)
        part = tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        if BLOCKWISE:
            g = k0 // BLOCK_K
            sx = tl.load(sx_ptr + rows * stride_sx + g, mask=row_ok, other=0.0)
            sw = tl.load(sw_ptr + (cols // GROUP_N) * stride_sw + g, mask=col_ok, other=0.0)
            acc += part * sx[:, None] * sw[None, :]
        else:
            acc += part
    if not BLOCKWISE:
        sx = tl.load(sx_ptr + rows * stride_sx, mask=row_ok, other=0.0)
        sw = tl.load(sw_ptr + cols * stride_sw, mask=col_ok, other=0.0)
        acc = acc * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def w8a8_gemv_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block: tuple[int, int] | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The same product as w8a8_mm_ref, in the Triton kernel (any M, in row blocks of GEMV_ROWS)."""
    require_triton()
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    if block is not None:
        group_n, block_k = block
        if group_n & (group_n - 1) or block_k & (block_k - 1) or k % block_k:
            raise ValueError(f"the Triton W8A8 kernel takes power-of-two blocks dividing K, got {block} for K={k}")
    else:
        group_n, block_k = 1, 256 if xq.is_cuda else 32
    if block_n is None:
        block_n = 16 if xq.is_cuda else 8
    if block is not None:
        block_n = min(block_n, group_n)
    block_m = min(GEMV_ROWS, max(1, triton.next_power_of_2(m)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    sx, sw = x_scale.float().contiguous(), w_scale.float().contiguous()
    _w8a8_gemv_kernel[grid](
        xq,
        sx,
        wq,
        sw,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        xq.stride(0),
        wq.stride(0),
        y.stride(0),
        sx.stride(0),
        sw.stride(0),
        HAS_BIAS=bias is not None,
        BLOCKWISE=block is not None,
        GROUP_N=group_n,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y


@functools.cache
def _has_fp8_mm(device: torch.device) -> bool:
    """torch._scaled_mm with per-row scales needs compute capability 8.9 (Ada) or 9.0 (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _scaled_mm_fp8(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    """cuBLASLt FP8 GEMM with per-token and per-channel scales (wq^T is column-major as it needs)."""
    y = torch._scaled_mm(
        xq, wq.t(), scale_a=x_scale.float(), scale_b=w_scale.float().view(1, -1), out_dtype=torch.bfloat16
    )
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def _int_mm(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    """cuBLAS int8 GEMM (int32 accumulation, exact), then both scales in float32."""
    y = torch._int_mm(xq, wq.t()).float() * x_scale.float() * w_scale.float().view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w8a8_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The W8A8 product on the best path for this device and shape (see the module docstring)."""
    if not xq.is_cuda:
        return w8a8_mm_ref(xq, x_scale, wq, w_scale, bias, out_dtype, block)
    m, k = xq.shape
    n = wq.shape[0]
    if block is None and m > GEMV_ROWS:
        if xq.dtype == torch.float8_e4m3fn and _has_fp8_mm(xq.device) and k % 16 == 0 and n % 16 == 0:
            return _scaled_mm_fp8(xq, x_scale, wq, w_scale, bias, out_dtype)
        if xq.dtype == torch.int8 and m > 16 and k % 8 == 0 and n % 8 == 0:
            return _int_mm(xq, x_scale, wq, w_scale, bias, out_dtype)
    return w8a8_gemv_triton(xq, x_scale, wq, w_scale, bias, out_dtype, block)
