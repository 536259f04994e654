"""Linear layers for one or two rows: a Triton GEMV that streams the weight at full bandwidth.

Batch-1 decode is a chain of matrix-vector products whose cost is reading each weight once. cuBLAS
picks tile shapes for them that leave bandwidth unused on an H100 (its split-K variants also add a
reduce kernel); a plain kernel where each program owns a few output features and walks the whole K
dimension in wide, pipelined loads matches it on Llama-3-8B's QKV projection and beats it by 5-13% on
the others (o_proj 20.5 vs 23.2 us, gate_up 90.5 vs 97.2, down 53.7 vs 56.4, LM head 347 vs 387:
benchmarks/kernel_bench.py --only gemv, benchmarks/results/h100/kernels_gemv_prefill.json).
On the H200, with 1.4x the bandwidth and the same cores, cuBLAS wins instead: Llama-3-8B decode at batch
1 takes 4.58 ms with cuBLAS against 4.70 ms with the GEMV, at batch 2 4.65 against 5.75 (the 2-row GEMV
was slower than batch 4; o_proj alone 17.7 vs 42.1 us): benchmarks/results/h200/. Where a GPU has
measured choices (kernels/gemv_table.py: this GEMV, the tensor-core kernel of kernels/skinny_mm.py or
cuBLAS, per shape and row count) `linear_triton` takes them; elsewhere the GEMV up to
`GEMV_ROWS_BY_GPU` rows and cuBLAS above.
The reference is `linear_ref` (F.linear).
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mini_infer.kernels._triton import require_triton, tl, triton
from mini_infer.kernels.gemv_table import tuned_choice
from mini_infer.kernels.skinny_mm import SkinnyConfig, skinny_mm

GEMV_MAX_ROWS = 2  # the kernel's limit
# Rows up to which linear_triton takes the GEMV, as measured end to end on each GPU (above); other GPUs get
# cuBLAS until measured. Off CUDA (the interpreter tests) the kernel takes its full two rows.
GEMV_ROWS_BY_GPU = {"H100": 2, "H200": 0}


@functools.cache
def gemv_dispatch_rows(device: torch.device) -> int:
    if device.type != "cuda":
        return GEMV_MAX_ROWS
    name = torch.cuda.get_device_name(device)
    return next((rows for gpu, rows in GEMV_ROWS_BY_GPU.items() if gpu in name), 0)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 4  # output features per program: many small programs keep every SM's loads in flight
    block_k: int = 1024
    num_warps: int = 4
    num_stages: int = 3


# Best per shape on an H100 (benchmarks/kernel_bench.py --only gemv --sweep): the large projections (gate_up, the
# LM head) like one more stage in flight.
SMALL_GEMV_CONFIG = GemvConfig()
LARGE_GEMV_CONFIG = GemvConfig(num_stages=4)
INTERPRETER_GEMV_CONFIG = GemvConfig(block_n=16, block_k=64)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    N,
    K,
    x_row_stride,
    w_row_stride,
    y_row_stride,
    ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y[r, n] = sum_k x[r, k] * w[n, k] (+ bias[n]) for BLOCK_N features n and all ROWS rows r."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, ROWS)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * w_row_stride + offs_k[None, :]
    x_ptrs = x_ptr + rows[:, None] * x_row_stride + offs_k[None, :]
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptrs + k0)
        else:
            k_mask = (k0 + offs_k) < K
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=k_mask[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * y_row_stride + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[None, :])


def gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """F.linear for x: [M, K] with M <= GEMV_MAX_ROWS; weight [N, K] and x with unit last strides.
    Accumulates in float32 and rounds once, as cuBLAS does."""
    require_triton()
    rows, k = x.shape
    n = weight.shape[0]
    if rows > GEMV_MAX_ROWS or weight.shape[1] != k or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"gemv_triton takes at most {GEMV_MAX_ROWS} rows with unit last strides")
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    if config is None:
        config = (LARGE_GEMV_CONFIG if n >= 16384 else SMALL_GEMV_CONFIG) if x.is_cuda else INTERPRETER_GEMV_CONFIG
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        ROWS=rows,
        HAS_BIAS=bias is not None,
        EVEN_K=k % config.block_k == 0,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A few rows: the kernel measured fastest for this GPU and shape (kernels/gemv_table.py), else the GEMV
    up to `GEMV_ROWS_BY_GPU` rows; cuBLAS otherwise."""
    rows = x.shape[0] if x.dim() == 2 else 0
    if rows == 0 or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return F.linear(x, weight, bias)
    choice = tuned_choice(x.device, weight.dtype, rows, weight.shape[0], weight.shape[1])
    if choice is not None:
        if choice.kernel == "skinny":
            return skinny_mm(x, weight, bias, config=SkinnyConfig(**choice.tile))
        if choice.kernel == "gemv" and rows <= GEMV_MAX_ROWS:
            return gemv_triton(x, weight, bias, GemvConfig(**choice.tile))
        return F.linear(x, weight, bias)
    if rows <= gemv_dispatch_rows(x.device):
        return gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)
