"""Paged attention references: prefill (varlen chunks over a cached prefix) and decode.

Both read every key and value through the block tables; this step's keys and values are stored
in the cache before attention runs. Query i of a chunk of length L in a sequence of total length
S sits at position S - L + i and attends to keys 0 .. S - L + i (causal). Heads are grouped (GQA):
query head h reads KV head h // (Hq // Hk). An fp8 pool's keys and values are read as e4m3 times
k_scale / v_scale, rounded to q's dtype (kv_quant.py), right after the gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mini_infer.kernels.kv_quant import dequantize_kv_ref


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]  # [S, Hk, D]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [L, Hq, D] at the last L positions of k, v: [S, Hk, D]; float32 softmax."""
    L, Hq, _ = q.shape
    S, Hk, _ = k.shape
    group = Hq // Hk
    qf = q.float().transpose(0, 1)  # [Hq, L, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, L, S]
    q_pos = torch.arange(S - L, S, device=q.device).unsqueeze(1)
    k_pos = torch.arange(S, device=q.device).unsqueeze(0)
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    out = torch.matmul(F.softmax(scores, dim=-1), vf)  # [Hq, L, D]
    return out.transpose(0, 1).to(q.dtype)


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    tiles: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [Tq, Hq, D] packed chunks; cu_seqlens_q: [B + 1]; seq_lens: [B] keys per sequence
    (cached prefix + this chunk); block_tables: [B, max_blocks]; tiles is the Triton kernel's work
    list, which the reference does not need; k_scale, v_scale: an fp8 pool's. Returns [Tq, Hq, D]."""
    out = torch.empty_like(q)
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        k = dequantize_kv_ref(_gather_kv(k_cache, block_tables[i], seq_len), k_scale, q.dtype)
        v = dequantize_kv_ref(_gather_kv(v_cache, block_tables[i], seq_len), v_scale, q.dtype)
        out[s:e] = _attend(q[s:e], k, v, scale)
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence at its last position. A row with seq_len 0
    (padding in a CUDA-graph batch) gives zeros. Returns [B, Hq, D]."""
    out = torch.zeros_like(q)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k = dequantize_kv_ref(_gather_kv(k_cache, block_tables[i], seq_len), k_scale, q.dtype)
        v = dequantize_kv_ref(_gather_kv(v_cache, block_tables[i], seq_len), v_scale, q.dtype)
        out[i : i + 1] = _attend(q[i : i + 1], k, v, scale)
    return out


# ---------------------------------------------------------------------------------------------------
# The torch backend's attention (the CPU path): the references' arithmetic, batched. The references
# above loop over sequences, ~10 small ops each per layer; on a CPU those per-op costs, not the FLOPs,
# set a small model's step time (a decode step of stories260K at batch 16 spent 15 of its 18 ms in
# them). Here sequences whose key counts are within 2x of each other share one padded gather and one
# attention call; the padded keys are masked out, so they weigh exactly 0. Chunks of several queries go
# through torch's scaled_dot_product_attention in float32: the references' softmax(q k^T * scale) v,
# summed in its own (blocked) order, within ~3e-7 of them, and what transformers itself runs on a CPU;
# GQA is its enable_gqa broadcast. One query per row (decode) takes the same call, its padded keys masked
# per row. Every layer of a decode step reads the same pool slots, so the step builds them once on the
# host (decode_keys, into the attention metadata).


def _length_groups(lens: list[int], block_size: int) -> list[list[int]]:
    """Row indices grouped by the power of two above their block count: padding to a group's longest
    row then costs under 2x its keys, and a step with similar lengths (the usual case) is one group."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lens):
        if n > 0:
            groups.setdefault((-(-n // block_size) - 1).bit_length(), []).append(i)
    return list(groups.values())


def _gather_kv_rows(
    cache: torch.Tensor, slots: torch.Tensor, kv_scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The keys (or values) at slots [R, S] of the pool, in dtype: [R, S, Hk, D]. One index_select of the
    flat pool, a fraction of the cost of advanced indexing by block."""
    flat = cache.view(-1, *cache.shape[2:])
    rows = flat.index_select(0, slots.flatten()).view(*slots.shape, *cache.shape[2:])
    return dequantize_kv_ref(rows, kv_scale, dtype)


@dataclass
class DecodeKeys:
    """What every layer's decode attention of a step reads, built once per step on the host: the pool slots
    of each row's keys, flat (row-major [R * S]), and which of the S are the row's own ([R, 1, 1, S], the
    attention mask; None when every row has all S, as at batch 1: SDPA without a mask gives the same bits
    and skips its masked path)."""

    slots: torch.Tensor
    allowed: torch.Tensor | None
    shape: tuple[int, int]  # (R, S)

    def to(self, device: torch.device) -> DecodeKeys:
        allowed = None if self.allowed is None else self.allowed.to(device)
        return DecodeKeys(self.slots.to(device), allowed, self.shape)


def decode_keys(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> DecodeKeys | None:
    """The step's DecodeKeys when its decode rows form one length group (the usual step; None otherwise, and
    attention builds its groups itself)."""
    lens = seq_lens.tolist()
    groups = _length_groups(lens, block_size)
    if len(groups) != 1 or len(groups[0]) != len(lens):
        return None
    pos = np.arange(max(lens))
    slots = block_tables[:, pos // block_size].astype(np.int64) * block_size + pos % block_size
    shape = len(lens), len(pos)
    allowed = None
    if min(lens) < len(pos):
        allowed = torch.from_numpy(pos[None, :] < seq_lens[:, None]).view(shape[0], 1, 1, shape[1])
    return DecodeKeys(torch.from_numpy(np.ascontiguousarray(slots).reshape(-1)), allowed, shape)


def kv_pool_slots(k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor | None:
    """A layer's keys and values as one [2, slots, Hk, D] view, when its values follow its keys in memory
    (the pool's [2, blocks, block_size, Hk, D] layout), so a gather or a store is one op for both; else
    None."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape):
        return None
    numel = k_cache.numel()
    if v_cache.data_ptr() != k_cache.data_ptr() + numel * k_cache.element_size():
        return None
    row = k_cache.shape[2] * k_cache.shape[3]
    return k_cache.as_strided((2, numel // row, *k_cache.shape[2:]), (numel, row, k_cache.shape[3], 1))


def _gather_kv_pair(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    shape: tuple[int, int],
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at the flat slots, each [*shape, Hk, D] in dtype: one index_select of the pool's
    pair view where it has one (30 against 43 us for two, stories260K's decode at 16 rows), else two."""
    both = kv_pool_slots(k_cache, v_cache)
    if both is not None:
        k, v = both.index_select(1, slots).view(2, *shape, *k_cache.shape[2:])
        return dequantize_kv_ref(k, k_scale, dtype), dequantize_kv_ref(v, v_scale, dtype)
    return _gather_kv_rows(k_cache, slots.view(shape), k_scale, dtype), _gather_kv_rows(
        v_cache, slots.view(shape), v_scale, dtype
    )


def _key_slots(block_tables: torch.Tensor, num_keys: int, block_size: int) -> torch.Tensor:
    """[R, num_keys] pool slot of each row's keys 0 .. num_keys - 1 (rows with fewer keys read slots that
    their mask then hides)."""
    pos = torch.arange(num_keys, device=block_tables.device)
    return block_tables.index_select(1, pos // block_size).long() * block_size + pos % block_size


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [R, L, Hq, D] at positions q_pos [R, L]: keys after a query's position are masked (a padded
    query at -1 sees none, for the caller to drop); k, v: [R, S, Hk, D]. float32 softmax."""
    S = k.shape[1]
    allowed = torch.arange(S, device=q.device).view(1, 1, S) <= q_pos.unsqueeze(-1)  # [R, L, S]
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2),
        k.float().transpose(1, 2),
        v.float().transpose(1, 2),
        attn_mask=allowed.unsqueeze(1),
        scale=scale,
        enable_gqa=True,
    )  # [R, Hq, L, D]
    return out.transpose(1, 2).to(q.dtype)


def _attend_one_query(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q: [R, Hq, D], one query per row at its last position; k, v: [R, S, Hk, D]; allowed [R, 1, 1, S]: the
    row's own keys (None: all). One SDPA call in float32 (as `_attend_rows`, and transformers' own attention),
    with each KV head's group of query heads as that head's queries ([R, Hk, Hq / Hk, D]) rather than
    broadcast by enable_gqa: half the (row, head) pairs the CPU kernel walks at GQA 2 (118 against 142 us a
    layer, stories260K's shapes at 16 rows; 310 against 640 at 32 / 8 heads of 64), within float32 rounding
    of it. On a CPU step of one thread one SDPA call took half the time of two matmuls, a mask and a softmax."""
    R, Hq, D = q.shape
    Hk = k.shape[2]
    out = F.scaled_dot_product_attention(
        q.float().view(R, Hk, Hq // Hk, D),
        k.float().transpose(1, 2),
        v.float().transpose(1, 2),
        attn_mask=allowed,
        scale=scale,
    )  # [R, Hk, Hq / Hk, D]
    return out.reshape(R, Hq, D).to(q.dtype)


def decode_attention_batched(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    keys: DecodeKeys | None = None,
) -> torch.Tensor:
    """decode_attention_ref's arguments and result, computed a group of rows at a time (the whole batch
    at once when its lengths are within 2x, without gathering its rows). keys: the step's DecodeKeys,
    when its rows form one group."""
    if keys is not None:
        k, v = _gather_kv_pair(k_cache, v_cache, keys.slots, keys.shape, k_scale, v_scale, q.dtype)
        return _attend_one_query(q, k, v, keys.allowed, scale)
    lens = seq_lens.tolist()
    groups = _length_groups(lens, k_cache.shape[1])
    if len(groups) == 1 and len(groups[0]) == len(lens):  # the usual step: one group, every row
        slots = _key_slots(block_tables, max(lens), k_cache.shape[1])
        k, v = _gather_kv_rows(k_cache, slots, k_scale, q.dtype), _gather_kv_rows(v_cache, slots, v_scale, q.dtype)
        q_pos = (seq_lens.long() - 1).unsqueeze(1)  # [R, 1]
        return _attend_rows(q.unsqueeze(1), k, v, q_pos, scale).squeeze(1)
    out = torch.zeros_like(q)
    for rows in groups:
        index = torch.tensor(rows, device=q.device)
        slots = _key_slots(block_tables.index_select(0, index), max(lens[i] for i in rows), k_cache.shape[1])
        k, v = _gather_kv_rows(k_cache, slots, k_scale, q.dtype), _gather_kv_rows(v_cache, slots, v_scale, q.dtype)
        q_pos = (seq_lens.index_select(0, index).long() - 1).unsqueeze(1)
        out[index] = _attend_rows(q.index_select(0, index).unsqueeze(1), k, v, q_pos, scale).squeeze(1)
    return out


def prefill_attention_batched(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    tiles: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """prefill_attention_ref's arguments and result. Chunks are grouped by key count as in decode, and a
    group's queries are padded to its longest chunk (padded queries read nothing and are dropped)."""
    out = torch.empty_like(q)
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    q_lens = [starts[i + 1] - starts[i] for i in range(len(lens))]
    for rows in _length_groups([n if q_lens[i] else 0 for i, n in enumerate(lens)], k_cache.shape[1]):
        index = torch.tensor(rows, device=q.device)
        num_keys, num_q = max(lens[i] for i in rows), max(q_lens[i] for i in rows)
        offsets = torch.arange(num_q, device=q.device)
        valid = offsets < torch.tensor([q_lens[i] for i in rows], device=q.device).unsqueeze(1)  # [R, Lmax]
        token = (torch.tensor([starts[i] for i in rows], device=q.device).unsqueeze(1) + offsets).masked_fill(~valid, 0)
        first_pos = torch.tensor([lens[i] - q_lens[i] for i in rows], device=q.device).unsqueeze(1)
        q_pos = (first_pos + offsets).masked_fill(~valid, -1)
        slots = _key_slots(block_tables.index_select(0, index), num_keys, k_cache.shape[1])
        k, v = _gather_kv_rows(k_cache, slots, k_scale, q.dtype), _gather_kv_rows(v_cache, slots, v_scale, q.dtype)
        res = _attend_rows(q[token], k, v, q_pos, scale)
        out[token[valid]] = res[valid]
    return out
