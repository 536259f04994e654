"""Attention prologue in one pass: optional per-head RMSNorm of q and k (Qwen3), RoPE, KV-cache store.

One kernel because the unfused sequence costs six small kernels per layer: two copies (the q/k views
of the fused qkv buffer are not contiguous), two norms, RoPE and the store. q and k are rotated in
place in the qkv buffer; k and v are written to the cache at their slots.

An fp8 pool (float8_e4m3fn) stores k / k_scale and v / v_scale in e4m3 (kv_quant.py); other pools store
the values in their own dtype and take no scales.

RoPE uses the rotate-half layout: `cos_sin_cache[pos]` holds cos(pos * inv_freq) in its first half and
sin in its second (float32, length head_dim); scaled frequencies (llama3) come in through the cache.
"""

import torch

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton
from mini_infer.kernels.kv_quant import is_fp8_kv, kv_scale_args, quantize_kv, quantize_kv_ref
from mini_infer.kernels.paged_attention import kv_pool_slots
from mini_infer.kernels.pdl import pdl_launch, pdl_wait
from mini_infer.kernels.rmsnorm import rms_norm_ref


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _heads_of_both(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q and k as one [T, Hq + Hk, D] view when k's heads follow q's in memory (the views of a fused qkv
    row), so RoPE is one pass of small ops instead of two; else None. A single token's views may report
    any stride for their size-1 first dimension, so it is compared only when there are several."""
    heads = q.shape[1] + k.shape[1]
    if q.shape[0] > 1 and q.stride(0) != k.stride(0):
        return None
    if q.stride()[1:] != k.stride()[1:] or q.stride(1) != q.shape[2] or q.dtype != k.dtype:
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size():
        return None
    return q.as_strided((q.shape[0], heads, q.shape[2]), (k.stride(0), *q.stride()[1:]))


def _keys_and_values(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """k and v as one [2, T, Hk, D] view when v's heads follow k's in memory (the views of a fused qkv
    row), so the store is one copy; else None."""
    if k.shape != v.shape or k.dtype != v.dtype or k.stride()[1:] != v.stride()[1:] or k.stride(-1) != 1:
        return None
    if k.shape[0] > 1 and k.stride(0) != v.stride(0):
        return None
    if k.stride(1) != k.shape[2] or v.data_ptr() != k.data_ptr() + k.shape[1] * k.shape[2] * k.element_size():
        return None
    return k.as_strided((2, *k.shape), (k.shape[1] * k.shape[2], *k.stride()))


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """RoPE of q: [T, Hq, D] and k: [T, Hk, D] in place (views with a unit last stride are fine)."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    both = _heads_of_both(q, k)
    if both is not None:
        both.copy_(_rotate(both, cos, sin))
        return
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))


def store_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [T, Hk, D]; caches: [num_blocks, block_size, Hk, D]; slot_mapping: [T] (slot -1 = skip).
    A batch with no skipped slot (every eager step) takes index_copy_, which costs a CPU step less than
    masking; either way the stored values are the inputs' own, or with an fp8 pool their e4m3 quantization
    by k_scale / v_scale (written through uint8 views: torch has no index_copy_ for fp8 on the CPU)."""
    if is_fp8_kv(k_cache):
        kv_scale_args(k_cache, k_scale, v_scale)
        k, v = quantize_kv_ref(k, k_scale).view(torch.uint8), quantize_kv_ref(v, v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    keep = slot_mapping >= 0
    if bool(keep.all()):
        pool, both = kv_pool_slots(k_cache, v_cache), _keys_and_values(k, v)
        if pool is not None and both is not None and both.dtype == pool.dtype:
            pool.index_copy_(1, slot_mapping, both)  # keys and values in one copy
            return
        k_flat.index_copy_(0, slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, slot_mapping, v.to(v_flat.dtype))
        return
    slots = slot_mapping[keep]
    k_flat[slots] = k[keep].to(k_flat.dtype)
    v_flat[slots] = v[keep].to(v_flat.dtype)


def rotary_store_kv_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """q: [T, Hq, D], k, v: [T, Hk, D] (views with a unit last stride are fine); caches:
    [num_blocks, block_size, Hk, D]; slot_mapping: [T] (-1 = skip). A norm weight of None skips that
    norm; the scales are an fp8 pool's (ignored otherwise). Built from rms_norm_ref, rotary_ref and
    store_kv_cache_ref, so its results are theirs by construction."""
    head_dim = q.shape[-1]
    qn = q if q_norm_weight is None else rms_norm_ref(q.reshape(-1, head_dim), q_norm_weight, eps).view(q.shape)
    kn = k if k_norm_weight is None else rms_norm_ref(k.reshape(-1, head_dim), k_norm_weight, eps).view(k.shape)
    rotary_ref(positions, qn, kn, cos_sin_cache)
    store_kv_cache_ref(kn, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if qn is not q:
        q.copy_(qn)
    if kn is not k:
        k.copy_(kn)


# ---------------------------------------------------------------------------------------------------
# Triton: a 2-D grid of (token, group of heads); a group is HEADS query heads, or HEADS key heads with
# their value heads, and each of the HEADS warps holds one head row. That is the layout rms_norm_triton
# gives a single row (one warp, D/32 values per lane), so the sum of squares adds in the same order and
# the normed rows are bit-identical to rms_norm_triton's. Rounding follows rms_norm too: the normed row
# to the input dtype, its product with the weight again; then RoPE in float32, rounded once.


@triton.jit
def _norm_rope_heads(
    ptr,
    head_stride,
    heads,
    head_mask,
    cos,
    sin,
    norm_ptr,
    eps,
    HAS_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Norms (optionally) and rotates rows `heads` of one token in place; returns the rotated halves."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, BLOCK_HALF)
    mask = head_mask[:, None] & (offs < HALF)[None, :]
    first = ptr + heads[:, None] * head_stride + offs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = head_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        xf = tl.load(ptr + heads[:, None] * head_stride + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(norm_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        x1f = ((x1f * inv_rms).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        x2f = ((x2f * inv_rms).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    o1 = (x1f * cos - x2f * sin).to(x1.dtype)
    o2 = (x2f * cos + x1f * sin).to(x1.dtype)
    tl.store(first, o1, mask=mask)
    tl.store(first + HALF, o2, mask=mask)
    return o1, o2


@triton.jit
def _rotary_store_kv_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    q_norm_ptr,
    k_norm_ptr,
    k_scale_ptr,
    v_scale_ptr,
    eps,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    cos_sin_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    Q_GROUPS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_Q_NORM: tl.constexpr,
    HAS_K_NORM: tl.constexpr,
    KV_FP8: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    HALF: tl.constexpr = HEAD_DIM // 2
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * cos_sin_stride + offs, mask=offs < HALF, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * cos_sin_stride + HALF + offs, mask=offs < HALF, other=0.0)[None, :]
    if group < Q_GROUPS:
        heads = group * HEADS + tl.arange(0, HEADS)
        _norm_rope_heads(
            q_ptr + token * q_token_stride,
            q_head_stride,
            heads,
            heads < NUM_Q_HEADS,
            cos,
            sin,
            q_norm_ptr,
            eps,
            HAS_Q_NORM,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_HALF,
        )
    else:
        heads = (group - Q_GROUPS) * HEADS + tl.arange(0, HEADS)
        head_mask = heads < NUM_K_HEADS
        k1, k2 = _norm_rope_heads(
            k_ptr + token * k_token_stride,
            k_head_stride,
            heads,
            head_mask,
            cos,
            sin,
            k_norm_ptr,
            eps,
            HAS_K_NORM,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_HALF,
        )
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:
            dst = (slot // PAGE_SIZE) * cache_block_stride + (slot % PAGE_SIZE) * cache_slot_stride
            dst = dst + heads[:, None] * cache_head_stride
            half_mask = head_mask[:, None] & (offs < HALF)[None, :]
            offs_d = tl.arange(0, BLOCK_D)
            row_mask = head_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
            v_rows = v_ptr + token * v_token_stride + heads[:, None] * v_head_stride
            v = tl.load(v_rows + offs_d[None, :], mask=row_mask)
            # New names, not k1 / k2 / v again: the compiler (Triton 3.6) refuses a variable whose type
            # changes inside this runtime branch (model dtype -> e4m3); the interpreter allows it.
            if KV_FP8:  # the rotated key as rounded to the model dtype, then quantized (as the reference)
                k_scale = tl.load(k_scale_ptr)
                k1_out, k2_out = quantize_kv(k1, k_scale), quantize_kv(k2, k_scale)
                v_out = quantize_kv(v, tl.load(v_scale_ptr))
            else:
                k1_out, k2_out, v_out = k1, k2, v
            k_dtype = k_cache_ptr.dtype.element_ty
            tl.store(k_cache_ptr + dst + offs[None, :], k1_out.to(k_dtype), mask=half_mask)
            tl.store(k_cache_ptr + dst + HALF + offs[None, :], k2_out.to(k_dtype), mask=half_mask)
            tl.store(v_cache_ptr + dst + offs_d[None, :], v_out.to(v_cache_ptr.dtype.element_ty), mask=row_mask)


def rotary_store_kv_triton(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton rotary_store_kv_ref. q, k, v may be strided views of the fused qkv buffer with a unit last
    stride; norm weights must have q's dtype (the model holds them so: rounding to it is what
    rms_norm does then)."""
    require_triton()
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    tensors = (q, k, v, cos_sin_cache, k_cache)
    if any(t.stride(-1) != 1 for t in tensors) or k_cache.stride() != v_cache.stride():
        raise ValueError("rotary_store_kv_triton needs unit last strides and equal k/v cache layouts")
    if cos_sin_cache.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"cos_sin_cache rows hold {cos_sin_cache.shape[-1]} values, head_dim is {head_dim}")
    for w in (q_norm_weight, k_norm_weight):
        if w is not None and (w.dtype != q.dtype or w.shape != (head_dim,) or w.stride(-1) != 1):
            raise ValueError(f"norm weights must be [{head_dim}] contiguous in {q.dtype}, got {w.dtype} {w.shape}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k and v caches must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    k_scale, v_scale = kv_scale_args(k_cache, k_scale, v_scale)
    if num_tokens == 0:
        return
    # One warp per head row (see above); 8 rows a program keeps programs large enough for long prefills.
    heads = min(8, next_pow2(max(num_q_heads, num_k_heads)))
    q_groups = triton.cdiv(num_q_heads, heads)
    grid = (num_tokens, q_groups + triton.cdiv(num_k_heads, heads))
    _rotary_store_kv_kernel[grid](
        positions.contiguous(),
        q,
        k,
        v,
        cos_sin_cache,
        k_cache,
        v_cache,
        slot_mapping.contiguous(),
        q_norm_weight if q_norm_weight is not None else q,
        k_norm_weight if k_norm_weight is not None else k,
        k_scale,
        v_scale,
        eps,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        Q_GROUPS=q_groups,
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        HEADS=heads,
        BLOCK_D=next_pow2(head_dim),
        BLOCK_HALF=next_pow2(head_dim // 2),
        HAS_Q_NORM=q_norm_weight is not None,
        HAS_K_NORM=k_norm_weight is not None,
        KV_FP8=is_fp8_kv(k_cache),
        num_warps=heads,
        **pdl_launch(q, "rotary"),
    )
