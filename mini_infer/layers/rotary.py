"""The RoPE cos/sin cache, with Llama-3 frequency scaling.

Frequencies follow Hugging Face's rope initialisation exactly (float32), so positions rotate the
same way as in transformers. kernels/rotary_store.py applies it, with the q/k norm and the KV-cache store.
"""

import math

import torch
from transformers import PretrainedConfig


def rope_parameters(config: PretrainedConfig) -> dict:
    """Reads rope settings from either transformers 5 (`rope_parameters`) or 4 (`rope_theta`/`rope_scaling`)."""
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_cos_sin_cache(config: PretrainedConfig, head_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos(pos * f) for each frequency f, then sin(pos * f)."""
    p = rope_parameters(config)
    rotary_dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    if rotary_dim != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (p["rope_theta"] ** exponent)
    if p["rope_type"] == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, p)
    elif p["rope_type"] != "default":
        raise ValueError(f"rope type {p['rope_type']!r} is not supported (supported: default, llama3)")
    freqs = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
