"""RMSNorm and fused residual-add + RMSNorm.

The reference computes in float32 and casts back, exactly as Hugging Face's LlamaRMSNorm does.
"""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight over the last dimension."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x (in place); returns rms_norm(residual)."""
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps)
