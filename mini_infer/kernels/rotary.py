"""Rotary position embedding (rotate-half layout), applied to q and k in place.

`cos_sin_cache[pos]` holds cos(pos * inv_freq) in its first half and sin in its second half
(float32, length head_dim); scaled frequencies (llama3) come in through the cache.
"""

import torch

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """q: [T, Hq, D], k: [T, Hk, D] (views with a unit last stride are fine); positions: [T]."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))


# ---------------------------------------------------------------------------------------------------
# Triton: one program per token rotates all its query and key heads, loading cos/sin once.


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    cos_sin_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * cos_sin_stride + offs_d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * cos_sin_stride + HALF + offs_d, mask=d_mask, other=0.0)[None, :]

    offs_h = tl.arange(0, BLOCK_Q_HEADS)
    mask = (offs_h < NUM_Q_HEADS)[:, None] & d_mask[None, :]
    first = q_ptr + token * q_token_stride + offs_h[:, None] * q_head_stride + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(first + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)

    offs_h = tl.arange(0, BLOCK_K_HEADS)
    mask = (offs_h < NUM_K_HEADS)[:, None] & d_mask[None, :]
    first = k_ptr + token * k_token_stride + offs_h[:, None] * k_head_stride + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(first + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


def rotary_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Triton rotary_ref, in place. q, k may be strided views (e.g. of a fused qkv buffer) as long as
    their last dim is contiguous; the rotary dim is the full head dim."""
    require_triton()
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_triton needs a unit stride along head_dim for q, k and the cache")
    if cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(f"cos_sin_cache rows hold {cos_sin_cache.shape[-1]} values, head_dim is {head_dim}")
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions.contiguous(),
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        HALF=half,
        BLOCK_Q_HEADS=next_pow2(num_q_heads),
        BLOCK_K_HEADS=next_pow2(num_k_heads),
        BLOCK_HALF=next_pow2(half),
        num_warps=4,
    )
