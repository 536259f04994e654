"""DeepSeek's RoPE on the qk_rope_head_dim slice: any transformers rope type (YaRN for the real models),
interleaved pairs or NeoX halves.

Frequencies and YaRN's attention factor come from transformers' own rope initialisation, so they match
it bit for bit; the factor scales cos and sin as transformers does (both q_pe and k_pe carry it).
Interleaved rotation writes its output de-interleaved (evens then odds), as transformers' V3 does: q_pe
and k_pe get the same permutation, so every score is unchanged and the cache holds the permuted k_pe.
"""

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mini_infer.layers.rotary import rope_parameters


def build_mla_cos_sin_cache(config: PretrainedConfig, rope_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, rope_dim] float32: cos(pos * f) * factor for each frequency f, then the sines."""
    p = rope_parameters(config)
    if p["rope_type"] == "default":
        exponent = torch.arange(0, rope_dim, 2, dtype=torch.int64).float() / rope_dim
        inv_freq, factor = 1.0 / (p["rope_theta"] ** exponent), 1.0
    elif p["rope_type"] in ROPE_INIT_FUNCTIONS:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[p["rope_type"]](config, torch.device("cpu"))
    else:
        raise ValueError(f"rope type {p['rope_type']!r} is not supported")
    positions = torch.arange(max_positions, dtype=torch.float32)  # on the default device (the model's)
    freqs = positions.unsqueeze(1) * inv_freq.float().to(positions.device).unsqueeze(0)
    return torch.cat((freqs.cos() * factor, freqs.sin() * factor), dim=-1)


def apply_mla_rope(x: torch.Tensor, cos_sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, ..., P] rotated by cos_sin [T, P] (this step's rows of the cache)."""
    half = x.shape[-1] // 2
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos_sin[:, :half].view(shape), cos_sin[:, half:].view(shape)
    xf = x.float()
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleave else (xf[..., :half], xf[..., half:])
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
