"""Paged prefill attention in Triton: causal, varlen, over a cached prefix, GQA.

Flash-attention style: a program owns BLOCK_M queries of one head of one sequence's chunk and walks
its visible keys in BLOCK_N tiles with an online softmax, reading every key and value through the
block table (the chunk's own keys were stored in the cache before this runs). Keys below the tile's
first query position are visible to every row and need no mask; only the last few tiles near the
diagonal are masked.

Programs take their (sequence, query tile) from a tile list the host builds (`build_prefill_tiles`),
heaviest first so the causal tail does not leave the GPU idle. The list has a fixed capacity per
token count and unused entries say -1, so one launch shape serves every batch of that many tokens:
that is what lets prefill run inside a CUDA graph. The reference is `prefill_attention_ref` in
paged_attention.py.
"""

from dataclasses import dataclass

import numpy as np
import torch

from mini_infer.kernels._triton import dot, dot_precision, next_pow2, require_triton, tl, triton, upcast_dot
from mini_infer.kernels.kv_quant import dequantize_kv, is_fp8_kv, kv_scale_args

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


# Measured best on an H100 (benchmarks/kernel_bench.py --sweep): 64-row query tiles, one warpgroup.
DEFAULT_PREFILL_CONFIG = PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
INTERPRETER_PREFILL_CONFIG = PrefillConfig(block_m=32, block_n=32)  # fewer wasted rows on the CPU


def default_prefill_config(device: torch.device) -> PrefillConfig:
    return DEFAULT_PREFILL_CONFIG if device.type == "cuda" else INTERPRETER_PREFILL_CONFIG


def max_prefill_tiles(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """Tiles that num_tokens query tokens in at most num_seqs chunks can need: each chunk adds at
    most one partial tile."""
    return -(-num_tokens // block_m) + min(num_seqs, num_tokens)


def build_prefill_tiles(
    q_lens: np.ndarray, seq_lens: np.ndarray, block_m: int, capacity: int | None = None
) -> np.ndarray:
    """int32 [capacity, 2]: (sequence, query tile) rows, the tiles with the most keys to read first,
    then (-1, -1) up to capacity (default: no padding)."""
    q_lens, seq_lens = np.asarray(q_lens, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64)
    counts = -(-q_lens // block_m)
    seq = np.repeat(np.arange(len(q_lens)), counts)
    m_tile = np.arange(len(seq)) - np.repeat(np.cumsum(counts) - counts, counts)
    keys = np.minimum(seq_lens[seq] - q_lens[seq] + (m_tile + 1) * block_m, seq_lens[seq])
    order = np.argsort(-keys, kind="stable")
    size = len(seq) if capacity is None else capacity
    if len(seq) > size:
        raise ValueError(f"{len(seq)} prefill tiles do not fit a list of {size}")
    tiles = np.full((size, 2), -1, dtype=np.int32)
    tiles[: len(seq), 0] = seq[order]
    tiles[: len(seq), 1] = m_tile[order]
    return tiles


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
    k_scale,
    v_scale,
    MASKED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Online-softmax update over key tiles [lo, hi); MASKED adds the causal and length masks; KV_FP8
    dequantizes each tile with k_scale / v_scale."""
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
        if KV_FP8:
            k = dequantize_kv(k, k_scale, q.dtype)
            v = dequantize_kv(v, v_scale, q.dtype)
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


@triton.jit(do_not_specialize=["block_table_stride"])  # step-to-step sizes: no recompiles
def _prefill_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    tiles_ptr,
    k_scale_ptr,
    v_scale_ptr,
    scale_log2e,
    q_token_stride,
    q_head_stride,
    out_token_stride,
    out_head_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    block_table_stride,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.load(tiles_ptr + 2 * tile).to(tl.int64)
    if batch < 0:  # an unused entry of the tile list
        return
    m_tile = tl.load(tiles_ptr + 2 * tile + 1)
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
    k_scale, v_scale = 1.0, 1.0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    # Keys below the tile's first query position are visible to all its rows.
    unmasked_end = (prefix + m_tile * BLOCK_M) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(prefix + (m_tile + 1) * BLOCK_M, seq_len)
    acc, m_i, l_i = _attend_tiles(
        q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, kv_head_offset, cache_block_stride,
        cache_slot_stride, q_pos, seq_len, 0, unmasked_end, scale_log2e, k_scale, v_scale,
        False, PAGE_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST_DOT, DOT_PRECISION, KV_FP8,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, kv_head_offset, cache_block_stride,
        cache_slot_stride, q_pos, seq_len, unmasked_end, kv_end, scale_log2e, k_scale, v_scale,
        True, PAGE_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, UPCAST_DOT, DOT_PRECISION, KV_FP8,
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
    tiles: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton prefill_attention_ref. q: [Tq, Hq, D] (any strides, unit last stride); caches
    [num_blocks, block_size, Hk, D] with a unit last stride, already holding this chunk's keys;
    cu_seqlens_q: [B + 1] int32; seq_lens: [B] int32 (cached prefix + chunk); block_tables:
    [B, max_blocks] int32. tiles: the int32 [n, 2] list from build_prefill_tiles with the config's
    block_m; without it the list is built here, which reads the lengths back from the device.
    k_scale, v_scale: an fp8 pool's. Returns [Tq, Hq, D] contiguous."""
    require_triton()
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("prefill_attention_triton needs unit last strides and equal k/v cache layouts")
    k_scale, v_scale = kv_scale_args(k_cache, k_scale, v_scale)
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    if config is None:
        config = default_prefill_config(q.device)
    if tiles is None:
        cu = cu_seqlens_q.cpu().numpy()
        tiles = torch.from_numpy(build_prefill_tiles(cu[1:] - cu[:-1], seq_lens.cpu().numpy(), config.block_m))
        tiles = tiles.to(q.device)
    if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 2 or not tiles.is_contiguous():
        raise ValueError("tiles must be a contiguous int32 [n, 2] list from build_prefill_tiles")
    if tiles.shape[0] == 0:
        return out
    _prefill_attention_kernel[(tiles.shape[0], num_q_heads)](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        tiles,
        k_scale,
        v_scale,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads,
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=max(16, next_pow2(head_dim)),
        UPCAST_DOT=upcast_dot(q),
        DOT_PRECISION=dot_precision(q.dtype),
        KV_FP8=is_fp8_kv(k_cache),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
