"""Rotary position embedding (rotate-half layout), applied to q and k in place.

`cos_sin_cache[pos]` holds cos(pos * inv_freq) in its first half and sin in its second half
(float32, length head_dim); scaled frequencies (llama3) come in through the cache.
"""

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """q: [T, Hq, D], k: [T, Hk, D] (views with a unit last stride are fine); positions: [T]."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))
