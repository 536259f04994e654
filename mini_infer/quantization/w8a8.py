"""The W8A8 linear method: 8-bit weights with per-channel or per-block scales, activations quantized per
token (or per token and K group) right before the product.

Online (`online=True`) the layer loads its weight in the model dtype and quantizes it after loading with
the activations' own rule (per output row: amax / qmax), so the engine holds only the 8-bit copy; from a
checkpoint the 8-bit `weight` and its scales load as they are. Either way the product is
kernels/scaled_mm.py's `w8a8_linear` (activation quantization + 8-bit product; references on CPU), or, for
an input the op before already quantized (a QuantizedActivation: quantization/fused_act_quant.py), its
`w8a8_linear_quantized` (the product alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mini_infer.kernels.act_quant import QuantizedActivation, act_quant_ref, check_quant_dtype
from mini_infer.kernels.scaled_mm import w8a8_linear, w8a8_linear_quantized

if TYPE_CHECKING:
    from mini_infer.layers.linear import LinearBase


def _param(data: torch.Tensor, loader, **attrs) -> nn.Parameter:
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = loader
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


class W8A8LinearMethod:
    """dtype: torch.float8_e4m3fn or torch.int8. block: (rows, cols) of one weight scale (HF block FP8),
    which also makes the activations' groups `cols` wide; None: per-channel weights, per-token activations.
    scale_name: the checkpoint's name of the weight scales (`weight_scale`, or `weight_scale_inv`)."""

    def __init__(
        self,
        dtype: torch.dtype,
        online: bool,
        block: tuple[int, int] | None = None,
        scale_name: str = "weight_scale",
    ) -> None:
        check_quant_dtype(dtype)
        if online and block is not None:
            raise ValueError("online quantization is per channel; block scales come from checkpoints")
        self.dtype, self.online, self.block, self.scale_name = dtype, online, block, scale_name

    @property
    def input_quant_dtype(self) -> torch.dtype | None:
        """The 8-bit dtype in which `apply` also takes its input pre-quantized (one scale per token), or None:
        block scales want one per token and K group, which the fused ops do not make."""
        return self.dtype if self.block is None else None

    def create_weights(self, layer: LinearBase) -> None:
        out, inp = layer.out_features, layer.in_features
        if self.online:  # model dtype until process_weights_after_loading
            layer.weight = _param(torch.empty(out, inp), layer.weight_loader)
            return
        if self.block is not None and inp % self.block[1]:
            raise ValueError(f"{inp} input features are not a whole number of {self.block[1]}-column blocks")
        layer.weight = _param(torch.empty(out, inp, dtype=self.dtype), layer.weight_loader)
        if self.block is None:
            scale = _param(torch.empty(out, 1, dtype=torch.float32), layer.weight_loader)
        else:
            bn, bk = self.block
            shape = (-(-out // bn), inp // bk)
            scale = _param(torch.empty(shape, dtype=torch.float32), layer.weight_loader, output_block=bn)
        layer.register_parameter(self.scale_name, scale)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if not self.online or layer.weight.dtype == self.dtype:  # from a checkpoint, or already done
            return
        q, scale = act_quant_ref(layer.weight.data, self.dtype)  # one scale per output row
        del layer.weight
        layer.weight = _param(q, layer.weight_loader)
        layer.register_parameter(self.scale_name, _param(scale, layer.weight_loader))

    def apply(
        self, layer: LinearBase, x: torch.Tensor | QuantizedActivation, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            return self._apply_quantized(layer, x, bias)
        shape = x.shape
        y = w8a8_linear(x.reshape(-1, shape[-1]), layer.weight, getattr(layer, self.scale_name), bias, self.block)
        return y.view(*shape[:-1], y.shape[-1])

    def _apply_quantized(self, layer: LinearBase, x: QuantizedActivation, bias: torch.Tensor | None) -> torch.Tensor:
        if self.input_quant_dtype != x.values.dtype:
            raise ValueError(f"this projection takes {self.input_quant_dtype} inputs, not {x.values.dtype}")
        shape = x.values.shape
        values, scales = x.values.reshape(-1, shape[-1]), x.scales.reshape(-1, 1)
        y = w8a8_linear_quantized(values, scales, layer.weight, getattr(layer, self.scale_name), bias, x.dtype)
        return y.view(*shape[:-1], y.shape[-1])
