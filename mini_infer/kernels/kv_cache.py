"""Write this step's keys and values into the paged KV cache."""

import torch

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton


def store_kv_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v: [T, Hk, D]; caches: [num_blocks, block_size, Hk, D]; slot_mapping: [T] (slot -1 = skip).
    A batch with no skipped slot (every eager step) takes index_copy_, which costs a CPU step less than
    masking; either way the stored values are the inputs' own."""
    k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    keep = slot_mapping >= 0
    if bool(keep.all()):
        k_flat.index_copy_(0, slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, slot_mapping, v.to(v_flat.dtype))
        return
    slots = slot_mapping[keep]
    k_flat[slots] = k[keep]
    v_flat[slots] = v[keep]


# ---------------------------------------------------------------------------------------------------
# Triton: one program per token copies all its KV heads; a slot of -1 returns at once.


@triton.jit
def _store_kv_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    PAGE_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (slot // PAGE_SIZE) * cache_block_stride + (slot % PAGE_SIZE) * cache_slot_stride
    dst += offs_h[:, None] * cache_head_stride + offs_d[None, :]
    k = tl.load(k_ptr + token * k_token_stride + offs_h[:, None] * k_head_stride + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + token * v_token_stride + offs_h[:, None] * v_head_stride + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_cache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton store_kv_cache_ref. k, v: [T, Hk, D] views with a unit last stride; the two caches
    share one layout [num_blocks, block_size, Hk, D] with a unit last stride."""
    require_triton()
    num_tokens, num_heads, head_dim = k.shape
    unit_last = k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1
    if not unit_last or k_cache.stride() != v_cache.stride():
        raise ValueError("store_kv_cache_triton needs unit last strides and equal k/v cache layouts")
    if num_tokens == 0:
        return
    _store_kv_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping.contiguous(),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        PAGE_SIZE=k_cache.shape[1],
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_HEADS=next_pow2(num_heads),
        BLOCK_D=next_pow2(head_dim),
        num_warps=4,
    )
