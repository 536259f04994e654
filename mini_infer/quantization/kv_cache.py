"""FP8 KV cache scales from a checkpoint: compressed-tensors' `kv_cache_scheme` (llm-compressor) stores one
k_scale and one v_scale per attention layer, the dequantization scales (value = e4m3 * scale).

Names read (vLLM reads the same): `<layer>.self_attn.k_scale` / `v_scale`, and the older
`<layer>.self_attn.k_proj.output_scale` / `v_proj.output_scale`. They load into the attention layer's
`k_scale` / `v_scale` buffers (`<layer>.self_attn.attn.*`), which stay 1.0 when a checkpoint has none.
A model-dtype pool ignores them. `q_scale` / `prob_scale` (FP8 attention arithmetic, which this engine
does not do) are skipped.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_KV_SCALE = re.compile(r"^(?P<prefix>.+\.self_attn)\.(?:(?P<kv>[kv])_scale|(?P<proj>[kv])_proj\.output_scale)$")
_UNUSED = re.compile(r"\.self_attn\.(?:attn\.)?(?:q_scale|prob_scale)$")


def kv_scale_target(name: str) -> str | None:
    """The buffer a checkpoint's KV scale loads into, or None if `name` is no KV scale."""
    m = _KV_SCALE.match(name)
    if m is None:
        return None
    return f"{m['prefix']}.attn.{m['kv'] or m['proj']}_scale"


def is_unused_attention_scale(name: str) -> bool:
    return _UNUSED.search(name) is not None


def load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Copies checkpoint tensor `name` (one positive value) into its layer's scale buffer."""
    target = kv_scale_target(name)
    buffers = dict(model.named_buffers())
    if target not in buffers:
        raise ValueError(f"checkpoint KV cache scale {name!r} matches no paged attention layer ({target!r})")
    if tensor.numel() != 1:
        raise ValueError(f"{name}: only per-tensor KV cache scales are supported, got shape {tuple(tensor.shape)}")
    value = float(tensor.float().reshape(()))
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: a KV cache scale must be positive and finite, got {value}")
    buffers[target].fill_(value)


def check_kv_cache_scheme(scheme: dict) -> None:
    """compressed-tensors' kv_cache_scheme: only static, symmetric, per-tensor 8-bit float."""
    expect = dict(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    for key, value in expect.items():
        if scheme.get(key) != value:
            raise ValueError(f"compressed-tensors kv_cache_scheme {key}={scheme.get(key)!r}: only {value!r}")
