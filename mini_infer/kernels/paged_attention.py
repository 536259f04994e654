"""Paged attention references: prefill (varlen chunks over a cached prefix) and decode.

Both read every key and value through the block tables; this step's keys and values are stored
in the cache before attention runs. Query i of a chunk of length L in a sequence of total length
S sits at position S - L + i and attends to keys 0 .. S - L + i (causal). Heads are grouped (GQA):
query head h reads KV head h // (Hq // Hk).
"""

import torch
import torch.nn.functional as F


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
) -> torch.Tensor:
    """q: [Tq, Hq, D] packed chunks; cu_seqlens_q: [B + 1]; seq_lens: [B] keys per sequence
    (cached prefix + this chunk); block_tables: [B, max_blocks]; tiles is the Triton kernel's work
    list, which the reference does not need. Returns [Tq, Hq, D]."""
    out = torch.empty_like(q)
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        k = _gather_kv(k_cache, block_tables[i], seq_len)
        v = _gather_kv(v_cache, block_tables[i], seq_len)
        out[s:e] = _attend(q[s:e], k, v, scale)
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence at its last position. A row with seq_len 0
    (padding in a CUDA-graph batch) gives zeros. Returns [B, Hq, D]."""
    out = torch.zeros_like(q)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k = _gather_kv(k_cache, block_tables[i], seq_len)
        v = _gather_kv(v_cache, block_tables[i], seq_len)
        out[i : i + 1] = _attend(q[i : i + 1], k, v, scale)
    return out
