"""Paged decode attention in Triton: split-K flash-decoding, GQA-aware.

One query per sequence. A program owns one (sequence, KV head, split of the context): it loads each
K/V tile of its split once and scores it against all query heads of the group with one `tl.dot`
(the group padded to 16 rows), so GQA costs no extra K/V traffic. Splitting the context keeps the
GPU full when there are few, long sequences; a small reduce kernel merges the splits through their
log-sum-exp. The reference is `decode_attention_ref` in paged_attention.py. An fp8 pool's tiles are
dequantized in registers right after their load (kv_quant.py): half the bytes read per key.

The number of splits depends only on tensor shapes (batch, KV heads, block-table width), never on
the values in `seq_lens`, so the op does no host sync and can be captured in a CUDA graph. The
table is as wide as the longest sequence the model allows, usually far longer than the contexts in
the batch, so a split also has a maximum length: the work of a program stays short and the GPU
full whatever the real lengths, and splits past a sequence's end cost an early exit. The reduce
merges only the splits that hold keys.

The grid is (KV heads, sequences, splits), heads fastest, so programs start in row order; the scheduler
sends decodes longest context first, and the short rows fill the tail (benchmarks/decode_order.py).
"""

from dataclasses import dataclass

import torch

from mini_infer.kernels._triton import (
    dot,
    dot_precision,
    next_pow2,
    num_sms,
    require_triton,
    tl,
    triton,
    upcast_dot,
)
from mini_infer.kernels.kv_quant import dequantize_kv, is_fp8_kv, kv_scale_args
from mini_infer.kernels.pdl import pdl_launch, pdl_wait

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4  # split until batch * kv_heads * splits reaches this many programs per SM
    min_split_tokens: int = 64  # never split the context finer than this (one tile: batch 1 wants many)
    max_split_tokens: int | None = None  # nor coarser (None: no bound); see benchmarks/decode_sweep.py
    num_splits: int | None = None  # force a split count (tests, tuning)


DEFAULT_DECODE_CONFIG = DecodeConfig()


# Sizes that vary from step to step are not specialised on, so an eager step of a new batch size never
# waits for a compile (Triton would otherwise build a variant per value class: 1, multiples of 16, others).
@triton.jit(do_not_specialize=["block_table_stride", "split_len", "num_splits"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    k_scale_ptr,
    v_scale_ptr,
    scale_log2e,
    q_batch_stride,
    q_head_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    block_table_stride,
    out_batch_stride,
    out_head_stride,
    split_len,
    num_splits,
    NUM_Q_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    kv_head = tl.program_id(0)  # fastest: the heads of a sequence start together, in row order
    batch = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + batch)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + batch * q_batch_stride + heads[:, None] * q_head_stride + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + batch * block_table_stride
    kv_head_offset = kv_head * cache_head_stride
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    for tile_start in range(start, end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        if PAGE_SIZE % BLOCK_N == 0:  # the tile sits inside one page: one table lookup
            page = tl.load(table + tile_start // PAGE_SIZE).to(tl.int64)
            rows = page * cache_block_stride + (offs_n % PAGE_SIZE) * cache_slot_stride
        else:
            page = tl.load(table + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
            rows = page * cache_block_stride + (offs_n % PAGE_SIZE) * cache_slot_stride
        kv_offsets = rows[:, None] + kv_head_offset + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if KV_FP8:
            k = dequantize_kv(k, k_scale, q.dtype)
            v = dequantize_kv(v, v_scale, q.dtype)
        scores = dot(q, tl.trans(k), UPCAST_DOT, DOT_PRECISION) * scale_log2e
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new

    # A seq_len-0 padding row has l_i == 0: it writes zeros.
    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    result = acc / safe_l[:, None]
    out_mask = h_mask[:, None] & d_mask[None, :]
    if WRITE_OUT:
        out_ptrs = out_ptr + batch * out_batch_stride + heads[:, None] * out_head_stride + offs_d[None, :]
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif start < seq_len:  # the reduce reads only the splits that hold keys
        part = (batch * NUM_Q_HEADS + heads) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], result, mask=out_mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(safe_l), mask=h_mask)


@triton.jit(do_not_specialize=["split_len", "num_splits"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    out_ptr,
    out_batch_stride,
    out_head_stride,
    split_len,
    num_splits,
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + batch)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s * split_len < seq_len  # splits past the end were never written
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    part = (batch * NUM_Q_HEADS + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no split holds keys: seq_len 0
    weights = tl.exp2(lse - lse_max)
    part_mask = s_mask[:, None] & d_mask[None, :]
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=part_mask, other=0.0)
    total = tl.sum(weights, axis=0)
    merged = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0.0, total, 1.0)
    out_ptrs = out_ptr + batch * out_batch_stride + head * out_head_stride + offs_d
    tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_num_splits(
    batch: int, num_kv_heads: int, max_context: int, device: torch.device, config: DecodeConfig
) -> tuple[int, int]:
    """(splits, tokens per split) from shapes alone; tokens per split is a multiple of block_n."""
    tiles = max(1, triton.cdiv(max_context, config.block_n))
    if config.num_splits is not None:
        wanted = config.num_splits
    else:
        target_programs = config.programs_per_sm * num_sms(device)
        wanted = triton.cdiv(target_programs, max(1, batch * num_kv_heads))
        wanted = min(wanted, triton.cdiv(max_context, config.min_split_tokens))
        if config.max_split_tokens is not None:
            wanted = max(wanted, triton.cdiv(max_context, config.max_split_tokens))
    wanted = max(1, min(wanted, tiles))
    split_len = triton.cdiv(tiles, wanted) * config.block_n
    return triton.cdiv(tiles * config.block_n, split_len), split_len


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: DecodeConfig = DEFAULT_DECODE_CONFIG,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton decode_attention_ref. q: [B, Hq, D] (any strides, unit last stride); caches:
    [num_blocks, block_size, Hk, D] with a unit last stride; seq_lens: [B] int32 (0 = padding row,
    gives zeros); block_tables: [B, max_blocks] int32; k_scale, v_scale: an fp8 pool's. Returns
    [B, Hq, D] contiguous."""
    require_triton()
    batch, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("decode_attention_triton needs unit last strides and equal k/v cache layouts")
    group = num_q_heads // num_kv_heads
    k_scale, v_scale = kv_scale_args(k_cache, k_scale, v_scale)
    out = torch.empty((batch, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    max_context = block_tables.shape[1] * page_size
    num_splits, split_len = decode_num_splits(batch, num_kv_heads, max_context, q.device, config)
    block_d = max(16, next_pow2(head_dim))
    if num_splits > 1:
        part_shape = (batch, num_q_heads, num_splits)
        part_out = torch.empty((*part_shape, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_split_kernel[(num_kv_heads, batch, num_splits)](
        q,
        k_cache,
        v_cache,
        seq_lens,
        block_tables,
        out,
        part_out,
        part_lse,
        k_scale,
        v_scale,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        split_len,
        num_splits,
        NUM_Q_HEADS=num_q_heads,
        GROUP=group,
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_H=max(16, next_pow2(group)),
        BLOCK_D=block_d,
        BLOCK_N=config.block_n,
        WRITE_OUT=num_splits == 1,
        UPCAST_DOT=upcast_dot(q),
        DOT_PRECISION=dot_precision(q.dtype),
        KV_FP8=is_fp8_kv(k_cache),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch(q, "attention"),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_out,
            part_lse,
            seq_lens,
            out,
            out.stride(0),
            out.stride(1),
            split_len,
            num_splits,
            NUM_Q_HEADS=num_q_heads,
            HEAD_DIM=head_dim,
            BLOCK_S=max(16, next_pow2(num_splits)),  # one variant up to 16 splits
            BLOCK_D=next_pow2(head_dim),
            num_warps=4,
            **pdl_launch(q, "attention"),
        )
    return out
