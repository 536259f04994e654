"""Paged prefill attention in Triton: causal, varlen, over a cached prefix, GQA.

Flash-attention style: a program owns BLOCK_M queries of one head of one sequence's chunk and walks
its visible keys in BLOCK_N tiles with an online softmax, reading every key and value through the
block table (the chunk's own keys were stored in the cache before this runs). Keys below the tile's
first query position are visible to every row and need no mask; only the last few tiles near the
diagonal are masked. Heavy tiles (late in the chunk) are launched first so the causal tail does not
leave the GPU idle. The reference is `prefill_attention_ref` in paged_attention.py.
"""

from dataclasses import dataclass

import torch

from mini_infer.kernels._triton import dot, dot_precision, next_pow2, require_triton, tl, triton, upcast_dot

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


# Measured best on an H100 (benchmarks/kernels.py --sweep): 64-row query tiles, one warpgroup.
DEFAULT_PREFILL_CONFIG = PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
INTERPRETER_PREFILL_CONFIG = PrefillConfig(block_m=32, block_n=32)  # fewer wasted rows on the CPU


@triton.jit
def _attend_tiles(
    q,
    acc,
    m_i,
    l_i,
    k_cache_ptr,
    v_cache_ptr,
    table,
    kv_head_offset,
    cache_block_stride,
    cache_slot_stride,
    q_pos,
    seq_len,
    lo,
    hi,
    scale_log2e,
    MASKED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update over key tiles [lo, hi); MASKED adds the causal and length masks."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for tile_start in range(lo, hi, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        if PAGE_SIZE % BLOCK_N == 0:  # the tile sits inside one page: one table lookup
            page = tl.load(table + tile_start // PAGE_SIZE).to(tl.int64)
        elif MASKED:
            page = tl.load(table + offs_n // PAGE_SIZE, mask=offs_n < seq_len, other=0).to(tl.int64)
        else:
            page = tl.load(table + offs_n // PAGE_SIZE).to(tl.int64)
        rows = page * cache_block_stride + (offs_n % PAGE_SIZE) * cache_slot_stride + kv_head_offset
        kv_ptrs = rows[:, None] + offs_d[None, :]
        if MASKED:
            kv_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D == HEAD_DIM:
            k = tl.load(k_cache_ptr + kv_ptrs)
            v = tl.load(v_cache_ptr + kv_ptrs)
        else:
            k = tl.load(k_cache_ptr + kv_ptrs, mask=d_mask[None, :], other=0.0)
            v = tl.load(v_cache_ptr + kv_ptrs, mask=d_mask[None, :], other=0.0)
        scores = dot(q, tl.trans(k), UPCAST_DOT, DOT_PRECISION) * scale_log2e
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n < seq_len)[None, :]
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["block_table_stride", "num_m_tiles"])  # step-to-step sizes: no recompiles
def _prefill_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    scale_log2e,
    q_token_stride,
    q_head_stride,
    out_token_stride,
    out_head_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    block_table_stride,
    num_m_tiles,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_tile = num_m_tiles - 1 - tl.program_id(0)  # heaviest tiles first
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_seqlens_q_ptr + batch)
    q_len = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + batch)
    prefix = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tokens = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + tokens[:, None] * q_token_stride + head * q_head_stride + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + batch * block_table_stride
    kv_head_offset = kv_head * cache_head_stride
    # Keys below the tile's first query position are visible to all its rows.
    unmasked_end = (prefix + m_tile * BLOCK_M) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(prefix + (m_tile + 1) * BLOCK_M, seq_len)
    acc, m_i, l_i = _attend_tiles(
        q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, kv_head_offset, cache_block_stride,
        cache_slot_stride, q_pos, seq_len, 0, unmasked_end, scale_log2e,
        False, PAGE_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST_DOT, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, kv_head_offset, cache_block_stride,
        cache_slot_stride, q_pos, seq_len, unmasked_end, kv_end, scale_log2e,
        True, PAGE_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST_DOT, DOT_PRECISION,
    )  # fmt: skip

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + tokens[:, None] * out_token_stride + head * out_head_stride + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Triton prefill_attention_ref. q: [Tq, Hq, D] (any strides, unit last stride); caches
    [num_blocks, block_size, Hk, D] with a unit last stride, already holding this chunk's keys;
    cu_seqlens_q: [B + 1] int32; seq_lens: [B] int32 (cached prefix + chunk); block_tables:
    [B, max_blocks] int32. Pass max_seqlen_q (longest chunk) to skip a device-to-host sync.
    Returns [Tq, Hq, D] contiguous."""
    require_triton()
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("prefill_attention_triton needs unit last strides and equal k/v cache layouts")
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if config is None:
        config = DEFAULT_PREFILL_CONFIG if q.is_cuda else INTERPRETER_PREFILL_CONFIG
    num_m_tiles = triton.cdiv(max_seqlen_q, config.block_m)
    _prefill_attention_kernel[(num_m_tiles, num_q_heads, batch)](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_m_tiles,
        GROUP=num_q_heads // num_kv_heads,
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=max(16, next_pow2(head_dim)),
        UPCAST_DOT=upcast_dot(q),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
