"""The MLA attention backend's layer: a paged latent cache and absorbed attention over it.

Each cache slot holds one token's (kv_c ‖ k_pe): kv_lora_rank + qk_rope_head_dim values for all heads,
in the same block tables, block manager and prefix cache as paged K/V (the runner sizes the pool from
`kv_cache_shape` and never asks which layout it has). Decode and prefill both run the absorbed form:
W_UK (the key half of kv_b_proj) folds into the query, attention reads the latent as one shared KV
head (kernels/mla_decode.py), and W_UV (the value half) maps the result to per-head values. transformers
expands the latent to per-head K/V instead, so the tests against it check the absorption too.
"""

from __future__ import annotations

import torch
from torch import nn

from mini_infer.forward_context import get_attn_metadata
from mini_infer.kernels import KernelOps
from mini_infer.kernels.mla_decode import (
    mla_attention_ref,
    mla_attention_triton,
    mla_store_latent_ref,
    mla_store_latent_triton,
)

_KERNELS = {
    "torch": (mla_attention_ref, mla_store_latent_ref),
    "triton": (mla_attention_triton, mla_store_latent_triton),
}


def token_rows(positions: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's key count (position + 1) and block table, from the step's metadata (decode rows
    first, then the prefill chunks), on the device without a host sync."""
    meta = get_attn_metadata()
    nd = meta.num_decode_tokens
    tables = meta.decode_block_tables
    if num_tokens > nd:
        tokens = torch.arange(num_tokens - nd, device=positions.device)
        seq = torch.searchsorted(meta.prefill_cu_seqlens_q[1:].long(), tokens, right=True)
        seq = seq.clamp_max(max(meta.prefill_block_tables.shape[0] - 1, 0))
        prefill_tables = meta.prefill_block_tables.index_select(0, seq)
        tables = torch.cat((tables, prefill_tables)) if nd else prefill_tables
    lens = (positions[:num_tokens] + 1).to(torch.int32)
    if nd:  # decode rows: the metadata's own key counts (0 on a CUDA graph's padding rows)
        lens = torch.cat((meta.decode_seq_lens.to(torch.int32), lens[nd:]))
    return lens, tables


class MLAAttention(nn.Module):
    """Attention of one MLA layer over its latent cache; the projections stay in the model."""

    def __init__(self, num_heads: int, kv_lora_rank: int, rope_dim: int, scale: float, ops: KernelOps) -> None:
        super().__init__()
        self.num_heads, self.kv_lora_rank, self.rope_dim, self.scale = num_heads, kv_lora_rank, rope_dim, scale
        if ops.name not in _KERNELS:
            raise ValueError(f"MLA has no kernels for backend {ops.name!r}")
        self.attend, self.store = _KERNELS[ops.name]
        self.cache = torch.empty(0)  # a view into the engine's KV pool, bound by the model runner

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One latent entry per slot, shared by all heads."""
        return (num_blocks, block_size, self.kv_lora_rank + self.rope_dim)

    def bind_kv_cache(self, cache: torch.Tensor) -> None:
        self.cache = cache

    def forward(
        self,
        positions: torch.Tensor,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        kv_c: torch.Tensor,
        k_pe: torch.Tensor,
    ) -> torch.Tensor:
        """q_latent [T, H, R] (q_nope·W_UK), q_pe [T, H, P] and k_pe [T, P] rotated, kv_c [T, R] normed.
        Stores this step's latent, then returns the attention output in latent space, [T, H, R]."""
        meta = get_attn_metadata()
        self.store(torch.cat((kv_c, k_pe), dim=-1), self.cache, meta.slot_mapping)
        T = q_latent.shape[0]
        lens, tables = token_rows(positions, T)
        q = torch.cat((q_latent, q_pe), dim=-1)
        return self.attend(q, self.cache, lens, tables, self.kv_lora_rank, self.scale)
