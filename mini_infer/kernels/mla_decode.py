"""MLA attention over the paged latent cache, in the absorbed form, and the latent store.

Every head of an MLA layer reads the same cached entry per token, c = (kv_c ‖ k_pe) of width R + P
(kv_lora_rank + qk_rope_head_dim). With W_UK absorbed into the query (q = (q_nope·W_UK ‖ q_pe), also
R + P wide), a head's score against token j is q·c_j and its output the softmax-weighted sum of the
kv_c_j (R wide), which the caller projects through W_UV. So attention is multi-query attention with one
KV head whose keys are the whole entry and whose values are its first R columns.

Rows: one query row per token. Row i attends to keys 0 .. row_lens[i] - 1 of its block table (a token
at position p has p + 1 keys), which covers decode rows and the chunks of a prefill alike, and needs no
host-side shapes: the Triton path is CUDA-graph safe. The reference loops over sequences (the CPU path).
"""

import torch

from mini_infer.kernels._triton import dot, dot_precision, next_pow2, require_triton, tl, triton, upcast_dot


def mla_attention_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    row_lens: torch.Tensor,
    row_block_tables: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:
    """q [T, H, R + P]; cache [num_blocks, block_size, R + P]; row_lens [T]; row_block_tables [T, max_blocks].
    Returns [T, H, R] (float32 softmax; rows of length 0 give zeros). Rows that share a block table and
    are consecutive (a prefill chunk) share one gather of the latent."""
    T = q.shape[0]
    out = torch.zeros(*q.shape[:2], kv_lora_rank, dtype=q.dtype, device=q.device)
    lens = row_lens.tolist()
    block_size = cache.shape[1]
    start = 0
    while start < T:
        end = start + 1  # a run of rows of one sequence: same table, lengths counting up by one
        while (
            end < T and lens[end] == lens[end - 1] + 1 and torch.equal(row_block_tables[end], row_block_tables[start])
        ):
            end += 1
        n = lens[end - 1]
        if n > 0:
            blocks = row_block_tables[start, : -(-n // block_size)].long()
            latent = cache[blocks].flatten(0, 1)[:n].float()  # [S, R + P]
            scores = torch.einsum("thd,sd->ths", q[start:end].float(), latent) * scale
            key_pos = torch.arange(n, device=q.device)
            mask = key_pos[None, :] >= torch.tensor(lens[start:end], device=q.device)[:, None]  # [L, S]
            scores = scores.masked_fill(mask[:, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows of length 0 see no key
            out[start:end] = torch.einsum("ths,sr->thr", probs, latent[:, :kv_lora_rank]).to(q.dtype)
        start = end
    return out


def mla_store_latent_ref(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, R + P] into the flat pool at slot_mapping (-1: not stored)."""
    keep = slot_mapping >= 0
    cache.view(-1, cache.shape[-1])[slot_mapping[keep].long()] = latent[keep].to(cache.dtype)


# ---------------------------------------------------------------------------------------------------
# Triton. A program owns one row, BLOCK_H heads and one split of the row's keys (flash-decoding): all
# its heads share each latent tile it loads, so the latent is read once per head block, not per head.
# The splits' partial results (unnormalised output, running max, running sum) are merged in torch.


@triton.jit
def _mla_attention_kernel(
    q_ptr,
    cache_ptr,
    lens_ptr,
    tables_ptr,
    acc_ptr,
    stats_ptr,
    num_heads,
    q_stride_t,
    q_stride_h,
    table_stride,
    scale,
    R: tl.constexpr,
    P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    row, head_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    q_base = q_ptr + row.to(tl.int64) * q_stride_t + heads[:, None] * q_stride_h
    q_c = tl.load(q_base + offs_r[None, :], mask=head_mask[:, None] & (offs_r < R)[None, :], other=0.0)
    q_pe = tl.load(q_base + R + offs_p[None, :], mask=head_mask[:, None] & (offs_p < P)[None, :], other=0.0)

    seq_len = tl.load(lens_ptr + row)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        key_mask = pos < end
        block = tl.load(tables_ptr + row.to(tl.int64) * table_stride + pos // BLOCK_SIZE, mask=key_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        entry = cache_ptr + slot[:, None] * (R + P)
        kv_c = tl.load(entry + offs_r[None, :], mask=key_mask[:, None] & (offs_r < R)[None, :], other=0.0)
        k_pe = tl.load(entry + R + offs_p[None, :], mask=key_mask[:, None] & (offs_p < P)[None, :], other=0.0)
        s = dot(q_c, tl.trans(kv_c), UPCAST_DOT, DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        s += dot(q_pe, tl.trans(k_pe), UPCAST_DOT, DOT_PRECISION)
        s = tl.where(key_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(kv_c.dtype), kv_c, UPCAST_DOT, DOT_PRECISION)
        m = m_new

    out_row = (row.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
    tl.store(
        acc_ptr + out_row[:, None] * BLOCK_R + offs_r[None, :], acc, mask=head_mask[:, None] & (offs_r < R)[None, :]
    )
    tl.store(stats_ptr + out_row * 2, m, mask=head_mask)
    tl.store(stats_ptr + out_row * 2 + 1, l_sum, mask=head_mask)


def default_num_splits(num_rows: int, num_heads: int, block_h: int = 16) -> int:
    """Splits of each row's keys: enough programs to fill an H200's 132 SMs a few times over when the
    batch alone does not (a fixed function of the launch shape, so CUDA graphs replay it)."""
    programs = num_rows * -(-num_heads // block_h)
    return max(1, min(16, next_pow2(-(-4 * 132 // max(programs, 1)))))


def mla_attention_triton(
    q: torch.Tensor,
    cache: torch.Tensor,
    row_lens: torch.Tensor,
    row_block_tables: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
    num_splits: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """mla_attention_ref's arguments and result; no host sync (CUDA-graph safe)."""
    require_triton()
    T, H, D = q.shape
    R, P = kv_lora_rank, D - kv_lora_rank
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_h, block_r, block_p = 16, max(16, next_pow2(R)), max(16, next_pow2(P))
    splits = num_splits or default_num_splits(T, H, block_h)
    acc = torch.empty(T, H, splits, block_r, dtype=torch.float32, device=q.device)
    stats = torch.empty(T, H, splits, 2, dtype=torch.float32, device=q.device)
    if T == 0:
        return torch.empty(0, H, R, dtype=q.dtype, device=q.device)
    tables = row_block_tables if row_block_tables.stride(-1) == 1 else row_block_tables.contiguous()
    _mla_attention_kernel[(T, triton.cdiv(H, block_h), splits)](
        q,
        cache,
        row_lens,
        tables,
        acc,
        stats,
        H,
        q.stride(0),
        q.stride(1),
        tables.stride(0),
        scale,
        R=R,
        P=P,
        BLOCK_SIZE=cache.shape[1],
        NUM_SPLITS=splits,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
        UPCAST_DOT=upcast_dot(q),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    m, l_sum = stats[..., 0], stats[..., 1]  # [T, H, S]; an empty split has m = -inf, l = 0
    m_max = m.amax(dim=-1, keepdim=True).clamp_min(-1e30)
    w = torch.exp(m - m_max)
    out = (acc[..., :R] * w[..., None]).sum(dim=2) / (l_sum * w).sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return out.to(q.dtype)


@triton.jit
def _mla_store_kernel(latent_ptr, cache_ptr, slots_ptr, latent_stride, D: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK_D)
        x = tl.load(latent_ptr + token.to(tl.int64) * latent_stride + offs, mask=offs < D)
        tl.store(cache_ptr + slot * D + offs, x.to(cache_ptr.dtype.element_ty), mask=offs < D)


def mla_store_latent_triton(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """mla_store_latent_ref without a host sync (the -1 slots are skipped on the device)."""
    require_triton()
    T, D = latent.shape
    if T == 0:
        return
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    _mla_store_kernel[(T,)](latent, cache, slot_mapping, latent.stride(0), D=D, BLOCK_D=next_pow2(D))
