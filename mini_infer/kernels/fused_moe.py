"""The experts of a mixture-of-experts MLP: silu(x W1^T) * (x W3^T), then W2, weighted by the router.

Weights are stacked per layer: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], as the
loader builds them from the Hub's per-expert tensors. A layer's routing is (weights [T, k], expert ids
[T, k]) from moe_routing.py.

The reference (`fused_experts_ref`, the CPU path) loops over the experts that got tokens, as
transformers does. The Triton path has two ways through, chosen by token count alone:

* grouped GEMM (moe_align.py sorts the pairs by expert, padded to the row tile): one launch computes
  gate and up for every pair and writes silu(gate) * up, a second does the down projection and
  multiplies by the routing weight, then the k rows of each token are summed. A tile reads its
  expert's weights once for up to BLOCK_M pairs.
* GEMV (decode batches, where most experts get a pair or two): no sort at all. A program owns one
  (token, expert) pair and a slice of output features and streams that expert's rows; the down
  launch walks a token's k experts and writes their weighted sum once. At these sizes the sort, the
  gather and the padded 16-row tiles cost more than reading a few experts twice.

Both take 8-bit weights (int8 or float8) with a float32 scale per expert (w13_scale, w2_scale: [E]):
the tile is converted to the activation dtype for the dot and the accumulator is scaled once.
No path reads a value back to the host, and every shape follows from T, so they run inside CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mini_infer.kernels._triton import dot, dot_precision, require_triton, tl, triton, upcast_dot
from mini_infer.kernels.moe_align import moe_align_block_size
from mini_infer.kernels.moe_config import FusedMoeConfig, MoeGemmConfig, MoeGemvConfig, get_moe_config


def _dequantized(w: torch.Tensor, scale: torch.Tensor | None, expert: int) -> torch.Tensor:
    return w[expert] if scale is None else w[expert].float() * scale[expert].float()


def fused_experts_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, H] -> [T, H]: sum over j of topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).
    Each (token, expert) output is rounded to x's dtype, summed in float32 and rounded once."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1).long()
    top_k = topk_ids.shape[1]
    for expert in torch.unique(flat_ids).tolist():
        pairs = (flat_ids == expert).nonzero().squeeze(1)
        tokens = pairs // top_k
        w13_e, w2_e = _dequantized(w13, w13_scale, expert), _dequantized(w2, w2_scale, expert)
        rows = x[tokens]
        gate_up = F.linear(rows.to(w13_e.dtype), w13_e).to(x.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.linear((F.silu(gate) * up).to(w2_e.dtype), w2_e).to(x.dtype)
        weighted = (h.float() * topk_weights.reshape(-1)[pairs, None].float()).to(x.dtype)
        out.index_add_(0, tokens, weighted.float())
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton, grouped GEMM. Tile (pid_m, pid_n) multiplies BLOCK_M sorted pairs (all of one expert) by that
# expert's [BLOCK_N, K] weight slice; GROUP_M row tiles share each column tile for L2 reuse.


@triton.jit
def _weights_as(b, a, QUANTIZED: tl.constexpr):
    """A weight tile in the activations' dtype; 8-bit tiles go through float32 (exact), since Triton's
    interpreter reinterprets the bits of a direct int8 -> bfloat16 cast."""
    if QUANTIZED:
        return b.to(tl.float32).to(a.dtype)
    return b.to(a.dtype)


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    b_scale_ptr,
    topk_weights_ptr,
    sorted_ids_ptr,
    tile_experts_ptr,
    num_padded_ptr,
    N,
    K,
    num_pairs,
    num_m_tiles,
    a_stride,
    b_expert_stride,
    b_row_stride,
    c_stride,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """c[pair, n] for the pairs of one row tile. A row is a_ptr[pair // A_ROW_DIV] (the token for the
    gate_up GEMM, the pair's own row for down). GATED: b holds 2N rows, gate then up, and c gets
    silu(gate) * up; MUL_WEIGHT: c is scaled by the pair's routing weight."""
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n_tiles)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n_tiles)) % group_size
    pid_n = (pid % (GROUP_M * num_n_tiles)) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(tile_experts_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)
    m_mask = pairs < num_pairs
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * a_stride + offs_k[None, :]
    b_ptrs = b_ptr + expert * b_expert_stride + offs_n[None, :].to(tl.int64) * b_row_stride + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = _weights_as(tl.load(b_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0), a, HAS_SCALE)
        acc += dot(a, b, UPCAST_DOT, DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * b_row_stride + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up += dot(a, _weights_as(b_up, a, HAS_SCALE), UPCAST_DOT, DOT_PRECISION)
    if HAS_SCALE:
        scale = tl.load(b_scale_ptr + expert).to(tl.float32)
        acc = acc * scale
        acc_up = acc_up * scale
    if GATED:
        # rounded where the reference rounds: gate and up to the output dtype, then silu(gate)
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(c_ptr.dtype.element_ty).to(tl.float32)
        acc = silu * up
    if MUL_WEIGHT:
        weight = tl.load(topk_weights_ptr + pairs, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32) * weight[:, None]
    c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * c_stride + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _launch_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    b_scale: torch.Tensor | None,
    topk_weights: torch.Tensor,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    n: int,
    a_row_div: int,
    gated: bool,
    mul_weight: bool,
    config: MoeGemmConfig,
) -> None:
    sorted_ids, tile_experts, num_padded = align
    num_m_tiles = tile_experts.numel()
    if num_m_tiles == 0:
        return
    grid = (num_m_tiles * triton.cdiv(n, config.block_n),)
    _moe_gemm_kernel[grid](
        a,
        b,
        c,
        b_scale if b_scale is not None else topk_weights,
        topk_weights,
        sorted_ids,
        tile_experts,
        num_padded,
        n,
        b.shape[2],
        topk_weights.numel(),
        num_m_tiles,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        A_ROW_DIV=a_row_div,
        GATED=gated,
        MUL_WEIGHT=mul_weight,
        HAS_SCALE=b_scale is not None,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        UPCAST_DOT=upcast_dot(a),
        DOT_PRECISION=dot_precision(a.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def fused_experts_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: FusedMoeConfig,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The grouped-GEMM path of fused_experts_triton."""
    num_tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    hidden = w2.shape[1]
    intermediate = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    weighted = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1)
    align = moe_align_block_size(topk_ids, config.gate_up.block_m, num_experts)
    _launch_gemm(x, w13, intermediate, w13_scale, weights, align, inter, top_k, True, False, config.gate_up)
    if config.down.block_m != config.gate_up.block_m:
        align = moe_align_block_size(topk_ids, config.down.block_m, num_experts)
    _launch_gemm(intermediate, w2, weighted, w2_scale, weights, align, hidden, 1, False, True, config.down)
    return weighted.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton, GEMV (decode). gate_up: a program per (pair, column block); down: a program per (token,
# column block) that adds its k experts' weighted rows in float32 and stores once.


@triton.jit
def _moe_gemv_gate_up_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    ids_ptr,
    N,
    K,
    x_stride,
    w_expert_stride,
    w_row_stride,
    out_stride,
    TOP_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    token = pair // TOP_K
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + expert * w_expert_stride + offs_n[:, None].to(tl.int64) * w_row_stride + offs_k[None, :]
    x_ptrs = x_ptr + token.to(tl.int64) * x_stride + offs_k
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs + k0, mask=k_mask, other=0.0).to(tl.float32)
        mask = n_mask[:, None] & k_mask[None, :]
        w_gate = tl.load(w_ptrs + k0, mask=mask, other=0.0).to(tl.float32)
        w_up = tl.load(w_ptrs + N * w_row_stride + k0, mask=mask, other=0.0).to(tl.float32)
        gate += tl.sum(w_gate * x[None, :], axis=1)
        up += tl.sum(w_up * x[None, :], axis=1)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + expert).to(tl.float32)
        gate = gate * scale
        up = up * scale
    gate = gate.to(out_ptr.dtype.element_ty).to(tl.float32)
    up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + pair.to(tl.int64) * out_stride + offs_n, (silu * up).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _moe_gemv_down_kernel(
    h_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    ids_ptr,
    topk_weights_ptr,
    N,
    K,
    h_stride,
    w_expert_stride,
    w_row_stride,
    out_stride,
    TOP_K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        w_ptrs = w_ptr + expert * w_expert_stride + offs_n[:, None].to(tl.int64) * w_row_stride + offs_k[None, :]
        h_ptrs = h_ptr + pair.to(tl.int64) * h_stride + offs_k
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            h = tl.load(h_ptrs + k0, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + expert).to(tl.float32)
        weight = tl.load(topk_weights_ptr + pair).to(tl.float32)
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * weight
        total += acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * out_stride + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_mask)


def fused_experts_gemv(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeGemvConfig,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GEMV (decode) path of fused_experts_triton."""
    num_tokens, top_k = topk_ids.shape
    inter, hidden = w2.shape[2], w2.shape[1]
    intermediate = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    ids = topk_ids.reshape(-1)
    common = dict(
        TOP_K=top_k,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    _moe_gemv_gate_up_kernel[(num_tokens * top_k, triton.cdiv(inter, config.block_n))](
        x,
        w13,
        intermediate,
        w13_scale if w13_scale is not None else topk_weights,
        ids,
        inter,
        w13.shape[2],
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        intermediate.stride(0),
        HAS_SCALE=w13_scale is not None,
        **common,
    )
    _moe_gemv_down_kernel[(num_tokens, triton.cdiv(hidden, config.block_n))](
        intermediate,
        w2,
        out,
        w2_scale if w2_scale is not None else topk_weights,
        ids,
        topk_weights.reshape(-1),
        hidden,
        inter,
        intermediate.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        HAS_SCALE=w2_scale is not None,
        **common,
    )
    return out


def fused_experts_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: FusedMoeConfig | None = None,
) -> torch.Tensor:
    """Triton fused_experts_ref: the GEMV path up to config.gemv_max_tokens tokens, grouped GEMMs above.
    Weights and x need unit last strides (the loader's stacked tensors and activations have them)."""
    require_triton()
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return torch.empty_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if config is None:
        config = get_moe_config(w13.shape[0], w2.shape[1], w2.shape[2], w13.dtype, num_tokens, x.device)
    if num_tokens <= config.gemv_max_tokens:
        return fused_experts_gemv(x, w13, w2, topk_weights, topk_ids, config.gemv, w13_scale, w2_scale)
    return fused_experts_grouped(x, w13, w2, topk_weights, topk_ids, config, w13_scale, w2_scale)
