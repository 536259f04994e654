"""Paged attention layer: RoPE (after Qwen3's q/k norm) and the K/V store in one kernel, then attention
through block tables.

The decode part of the batch (one query per sequence) and the prefill part (chunks over a cached
prefix) go to different kernels of the chosen KernelOps backend. The pool's dtype decides how K/V are
stored: as they are, or (kv_cache_dtype="fp8") in e4m3 divided by this layer's k_scale / v_scale, which
the kernels take every call and ignore for a model-dtype pool (docs/quantization.md, "FP8 KV cache").
"""

import torch
from torch import nn

from mini_infer.forward_context import get_attn_metadata
from mini_infer.kernels import KernelOps


class PagedAttention(nn.Module):
    supports_fp8_kv_cache = True  # its kernels store and read e4m3 K/V (KVCache refuses fp8 for others)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, ops: KernelOps) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.ops = ops
        # Views into the engine's KV pool, bound by the model runner.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # Per-tensor fp8 scales (value = e4m3 * scale): the checkpoint's kv_cache_scheme k_scale / v_scale
        # when it has them (model_loader.py), else 1.0. Buffers, so a checkpoint without them still loads.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """This layer's share of the KV pool: keys and values of every slot."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def bind_kv_cache(self, cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = cache[0], cache[1]

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        q_norm_weight: torch.Tensor | None = None,
        k_norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
    ) -> torch.Tensor:
        """q, k, v: views of the fused qkv output; q and k are normed (given weights) and rotated in
        place, k and v stored in the cache, in one pass (no copies of the strided views)."""
        meta = get_attn_metadata()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.ops.rotary_store_kv(
            positions,
            q,
            k,
            v,
            cos_sin_cache,
            self.k_cache,
            self.v_cache,
            meta.slot_mapping,
            q_norm_weight,
            k_norm_weight,
            eps,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        nd = meta.num_decode_tokens
        # the torch backend's step-wide key slots (attention/backend.py); other backends leave them None
        slots = {} if meta.decode_keys is None else {"keys": meta.decode_keys}
        if nd == q.shape[0]:
            out = self.ops.decode_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.decode_seq_lens,
                meta.decode_block_tables,
                self.scale,
                **scales,
                **slots,
            )
        elif nd == 0:
            out = self.ops.prefill_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.prefill_cu_seqlens_q,
                meta.prefill_seq_lens,
                meta.prefill_block_tables,
                self.scale,
                meta.prefill_tiles,
                **scales,
            )
        else:
            out = torch.cat(
                (
                    self.ops.decode_attention(
                        q[:nd],
                        self.k_cache,
                        self.v_cache,
                        meta.decode_seq_lens,
                        meta.decode_block_tables,
                        self.scale,
                        **scales,
                        **slots,
                    ),
                    self.ops.prefill_attention(
                        q[nd:],
                        self.k_cache,
                        self.v_cache,
                        meta.prefill_cu_seqlens_q,
                        meta.prefill_seq_lens,
                        meta.prefill_block_tables,
                        self.scale,
                        meta.prefill_tiles,
                        **scales,
                    ),
                )
            )
        return out.view(-1, self.num_heads * self.head_dim)
