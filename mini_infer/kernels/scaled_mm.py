"""W8A8 matrix products: 8-bit activations times 8-bit weights, rescaled to the model dtype.

Two scale layouts:
- channel: x_scale [M, 1] (per token), w_scale [N, 1] (per output channel): y = (xq @ wq^T) * sx * sw^T.
- block: x_scale [M, K / gk] (per token and group of gk columns), w_scale [ceil(N / bn), K / gk] (per
  bn x gk weight block, DeepSeek-V3 / Qwen3-FP8's `weight_scale_inv`): each K group's partial product is
  rescaled by its two scales before the sum.

`w8a8_mm_ref` dequantizes both operands to float32 and multiplies: the CPU path and the oracle. On CUDA
`w8a8_linear` takes one fused launch for a single row (the Triton GEMV below quantizes the row itself and
reads each 8-bit weight once); above that `w8a8_mm` picks `torch._scaled_mm` for fp8 channel scales
(Hopper/Ada; rows padded to 16; the model dtype written directly, or through float32 where torch cannot),
`torch._int_mm` for int8 (rows padded to 24 below 17), and the Triton kernel (row blocks of GEMV_ROWS) for
anything else, e.g. block scales at prefill (correct, not tuned: it reads the weight once per 8 rows).
`w8a8_linear_quantized` is the same choice for an activation that arrives already quantized (the fused
norm / SiLU kernels, quantization/fused_act_quant.py).
"""

import functools

import torch

from mini_infer.kernels._triton import require_triton, tl, triton
from mini_infer.kernels.act_quant import (
    act_quant_ref,
    act_quant_triton,
    check_quant_dtype,
    quant_scale,
    quantize_values,
)
from mini_infer.kernels.gemv_table import GemvChoice, tuned_choice
from mini_infer.kernels.skinny_mm import SkinnyConfig, skinny_mm

GEMV_ROWS = 8  # rows per program of the Triton kernel at most
# Rows up to which w8a8_linear takes the fused GEMV on CUDA. On an H200 it beat quant + padded _scaled_mm
# at one row on 3 of Llama-3-8B's 4 projections and lost at 2-8 (quant_gemv.md), so: one row.
FUSED_GEMV_ROWS = 1


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
    QUANT_X: tl.constexpr,
    QMAX: tl.constexpr,
    IS_INT: tl.constexpr,
    GROUP_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """BLOCK_M rows x BLOCK_N outputs per program, walking K in BLOCK_K steps of 8-bit weight loads.
    Blockwise, BLOCK_K is the K group and each step's partial sums are rescaled by their group's scales.
    QUANT_X: x is in the model dtype and each program quantizes the rows it reads itself (per token, or per
    group: the same float32 steps as act_quant), so a decode GEMM is one launch; x is a few KB, L2-resident."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    sx_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    if QUANT_X and not BLOCKWISE:  # the row's amax first
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x_mask = row_ok[:, None] & (k0 + offs_k < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + offs_k)[None, :], mask=x_mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        sx_rows = quant_scale(amax, QMAX)
    elif not BLOCKWISE:
        sx_rows = tl.load(sx_ptr + rows * stride_sx, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
        if EVEN_K:  # out-of-range rows / outputs only reach results that are never stored
            x = tl.load(x_ptrs, mask=row_ok[:, None]).to(tl.float32)
            w = tl.load(w_ptrs, mask=col_ok[:, None]).to(tl.float32)
        else:  # masked lanes zeroed after the load: an fp8 load takes no `other`
            x_mask = row_ok[:, None] & k_ok[None, :]
            w_mask = col_ok[:, None] & k_ok[None, :]
            x = tl.where(x_mask, tl.load(x_ptrs, mask=x_mask).to(tl.float32), 0.0)
            w = tl.where(w_mask, tl.load(w_ptrs, mask=w_mask).to(tl.float32), 0.0)
        if BLOCKWISE:
            g = k0 // BLOCK_K
            if QUANT_X:
                sx = quant_scale(tl.max(tl.abs(x), axis=1), QMAX)
            else:
                sx = tl.load(sx_ptr + rows * stride_sx + g, mask=row_ok, other=0.0)
            if QUANT_X:
                x = quantize_values(x, sx[:, None], QMAX, IS_INT)
            part = tl.sum(x[:, None, :] * w[None, :, :], axis=2)
            sw = tl.load(sw_ptr + (cols // GROUP_N) * stride_sw + g, mask=col_ok, other=0.0)
            acc += part * sx[:, None] * sw[None, :]
        else:
            if QUANT_X:
                x = quantize_values(x, sx_rows[:, None], QMAX, IS_INT)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if not BLOCKWISE:
        sw = tl.load(sw_ptr + cols * stride_sw, mask=col_ok, other=0.0)
        acc = acc * sx_rows[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rows[:, None] * stride_y + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def gemv_config(m: int, on_cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K). 16 x 512 was the best one-row tile on an H200 for all four Llama-3-8B
    projections but o and down (8 x 512, within 10%): benchmarks/results/h200/quant_gemv.md."""
    block_m = min(GEMV_ROWS, triton.next_power_of_2(max(1, m)))
    if not on_cuda:
        return block_m, 8, 32
    return block_m, 16, max(64, 512 // block_m)


def w8a8_gemv_triton(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    block: tuple[int, int] | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """The product of w8a8_mm_ref in the Triton kernel (any M, in row blocks of up to GEMV_ROWS). With
    x_scale None, x is in the model dtype and quantized inside the kernel (to wq's dtype), as act_quant_ref
    would: the whole W8A8 linear in one launch."""
    require_triton()
    m, k = x.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return y
    block_m, block_n, block_k = config or gemv_config(m, x.is_cuda)
    if block is not None:
        group_n, block_k = block
        if group_n & (group_n - 1) or block_k & (block_k - 1) or k % block_k:
            raise ValueError(f"the Triton W8A8 kernel takes power-of-two blocks dividing K, got {block} for K={k}")
        block_n = min(block_n, group_n)
    else:
        group_n = 1
    if x.stride(-1) != 1:
        x = x.contiguous()
    sx = x_scale.float().contiguous() if x_scale is not None else y
    sw = w_scale.float().contiguous()
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_gemv_kernel[grid](
        x,
        sx,
        wq,
        sw,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        x.stride(0),
        wq.stride(0),
        y.stride(0),
        sx.stride(0),
        sw.stride(0),
        HAS_BIAS=bias is not None,
        BLOCKWISE=block is not None,
        QUANT_X=x_scale is None,
        QMAX=check_quant_dtype(wq.dtype),
        IS_INT=wq.dtype == torch.int8,
        GROUP_N=group_n,
        EVEN_K=k % block_k == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y


@functools.cache
def _has_fp8_mm(device: torch.device) -> bool:
    """torch._scaled_mm with per-row scales needs compute capability 8.9 (Ada) or 9.0 (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2]) if version else ()


def fp8_rowwise_writes(out_dtype: torch.dtype, capability: tuple[int, int], cuda_version: str | None) -> bool:
    """Whether torch._scaled_mm with per-row scales can write out_dtype itself. bfloat16 always. float16 /
    float32 only where torch sends row-wise scales to cuBLASLt (outer-vector scaling: compute capability 9.x
    with CUDA >= 12.9; aten ScaledBlas.cpp); elsewhere it runs a CUTLASS kernel that torch releases only
    allowed to write bfloat16 ("Only bf16 high precision output types are supported for row-wise
    scaling"), so those dtypes take _scaled_mm_fp8's float32 path instead."""
    if out_dtype == torch.bfloat16:
        return True
    if out_dtype not in (torch.float16, torch.float32):
        return False
    return capability[0] == 9 and _version_tuple(cuda_version) >= (12, 9)


@functools.cache
def _fp8_rowwise_writes_on(device: torch.device, out_dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return True  # the CPU _scaled_mm writes any float dtype (the tests run it there)
    return fp8_rowwise_writes(out_dtype, torch.cuda.get_device_capability(device), torch.version.cuda)


def _scaled_mm_fp8(xq, x_scale, wq, w_scale, bias, out_dtype, rowwise: bool | None = None) -> torch.Tensor:
    """cuBLASLt FP8 GEMM with per-token and per-channel scales (wq^T is column-major as it needs); fewer
    than 16 rows are padded to 16. Rowwise (where torch._scaled_mm writes out_dtype with row-wise scales,
    fp8_rowwise_writes) the scales are applied in the GEMM's epilogue and the output is out_dtype itself: a
    float32 model keeps float32 results, not bfloat16 ones. Otherwise the GEMM takes unit (tensor-wise)
    scales and writes float32, which every fp8 _scaled_mm can, and both scales are applied in float32 after
    it, as _int_mm does."""
    if rowwise is None:
        rowwise = _fp8_rowwise_writes_on(xq.device, out_dtype)
    m = xq.shape[0]
    if m < 16:
        xq = torch.cat([xq, xq.new_zeros(16 - m, xq.shape[1])])
    if rowwise:
        sx = x_scale.float()
        if m < 16:
            sx = torch.cat([sx, sx.new_ones(16 - m, 1)])
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=w_scale.float().view(1, -1), out_dtype=out_dtype)[:m]
    else:
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        y = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)[:m]
        y = y * x_scale.float() * w_scale.float().view(1, -1)
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


def _int_mm(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    """cuBLAS int8 GEMM (int32 accumulation, exact), then both scales in float32. It takes more than 16
    rows: fewer are padded with zero rows."""
    m = xq.shape[0]
    if m <= 16:
        xq = torch.cat([xq, xq.new_zeros(24 - m, xq.shape[1])])
    y = torch._int_mm(xq, wq.t())[:m].float() * x_scale.float() * w_scale.float().view(1, -1)
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
    if block is None:
        if xq.dtype == torch.float8_e4m3fn and _has_fp8_mm(xq.device) and k % 16 == 0 and n % 16 == 0:
            return _scaled_mm_fp8(xq, x_scale, wq, w_scale, bias, out_dtype)
        if xq.dtype == torch.int8 and k % 8 == 0 and n % 8 == 0:
            return _int_mm(xq, x_scale, wq, w_scale, bias, out_dtype)
    return w8a8_gemv_triton(xq, x_scale, wq, w_scale, bias, out_dtype, block)


def _tuned_gemv_config(choice: GemvChoice, m: int) -> tuple[int, int, int]:
    return min(GEMV_ROWS, triton.next_power_of_2(max(1, m))), choice.tile["block_n"], choice.tile["block_k"]


def _quantized_product(xq, x_scale, wq, w_scale, bias, out_dtype, block, choice: GemvChoice | None) -> torch.Tensor:
    """The product once x is in 8 bits: the measured skinny kernel, else w8a8_mm's pick."""
    if choice is not None and choice.kernel == "skinny":
        return skinny_mm(xq, wq, bias, x_scale, w_scale, out_dtype, SkinnyConfig(**choice.tile))
    return w8a8_mm(xq, x_scale, wq, w_scale, bias, out_dtype, block)


def w8a8_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The whole W8A8 linear: quantize x [M, K] per token (or token and group) to wq's dtype, multiply, rescale,
    in x's dtype. CPU: the references. CUDA, channel scales: the kernel measured fastest for this GPU and
    shape (kernels/gemv_table.py); otherwise one row (block scales: up to GEMV_ROWS) one fused GEMV launch;
    more, the activation-quant kernel then w8a8_mm."""
    group = block[1] if block is not None else None
    if not x.is_cuda:
        xq, x_scale = act_quant_ref(x, wq.dtype, group)
        return w8a8_mm_ref(xq, x_scale, wq, w_scale, bias, x.dtype, block)
    m = x.shape[0]
    choice = tuned_choice(x.device, wq.dtype, m, wq.shape[0], wq.shape[1]) if block is None else None
    if choice is not None and choice.kernel == "gemv":
        return w8a8_gemv_triton(x, None, wq, w_scale, bias, x.dtype, config=_tuned_gemv_config(choice, m))
    if choice is None and (m <= FUSED_GEMV_ROWS or (block is not None and m <= GEMV_ROWS)):
        return w8a8_gemv_triton(x, None, wq, w_scale, bias, x.dtype, block)
    xq, x_scale = act_quant_triton(x, wq.dtype, group)
    return _quantized_product(xq, x_scale, wq, w_scale, bias, x.dtype, block, choice)


def w8a8_linear_quantized(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """w8a8_linear (channel scales) for an x the op before already quantized per token (xq [M, K] in wq's
    dtype, x_scale [M, 1]): the kernel w8a8_linear would take for this shape, minus its quantization. The
    measured "gemv" is the same GEMV reading xq; with no measurement one row takes that GEMV too."""
    if xq.dtype != wq.dtype:
        raise ValueError(f"activations in {xq.dtype} for weights in {wq.dtype}: both must be one 8-bit dtype")
    if not xq.is_cuda:
        return w8a8_mm_ref(xq, x_scale, wq, w_scale, bias, out_dtype)
    m = xq.shape[0]
    choice = tuned_choice(xq.device, wq.dtype, m, wq.shape[0], wq.shape[1])
    if choice is not None and choice.kernel == "gemv":
        return w8a8_gemv_triton(xq, x_scale, wq, w_scale, bias, out_dtype, config=_tuned_gemv_config(choice, m))
    if choice is None and m <= FUSED_GEMV_ROWS:
        return w8a8_gemv_triton(xq, x_scale, wq, w_scale, bias, out_dtype)
    return _quantized_product(xq, x_scale, wq, w_scale, bias, out_dtype, None, choice)
