"""Picks a model's quantization config (the `quantization` argument and the checkpoint's
`quantization_config`) and swaps each projection's linear method before its weights load."""

from __future__ import annotations

import logging

from torch import nn
from transformers import PretrainedConfig

from mini_infer.quantization import QUANTIZATION_METHODS
from mini_infer.quantization.base import QuantizationConfig
from mini_infer.quantization.compressed_tensors import CompressedTensorsConfig
from mini_infer.quantization.fp8 import Fp8Config
from mini_infer.quantization.fused_act_quant import fuse_act_quant
from mini_infer.quantization.int8 import Int8Config

logger = logging.getLogger(__name__)


def checkpoint_quant_config(hf_config: PretrainedConfig) -> dict | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None or isinstance(qc, dict):
        return qc
    return qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))


def resolve_quant_config(quantization: str | None, hf_config: PretrainedConfig) -> QuantizationConfig | None:
    """None with an unquantized checkpoint: none. A quantized checkpoint: its own scheme (naming another is a
    ValueError). "fp8" / "int8" on an unquantized one: quantized online at load."""
    if quantization is not None and quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATION_METHODS)} or None, got {quantization!r}")
    qc = checkpoint_quant_config(hf_config)
    if qc is not None:
        method = qc.get("quant_method")
        if quantization is not None and quantization != method:
            raise ValueError(
                f"the checkpoint is quantized with {method!r}: leave quantization unset or pass {method!r}, "
                f"not {quantization!r}"
            )
        if method == "compressed-tensors":
            return CompressedTensorsConfig.from_checkpoint(qc)
        if method == "fp8":
            return Fp8Config.from_checkpoint(qc)
        raise ValueError(f"checkpoint quant_method {method!r} is not supported: only {list(QUANTIZATION_METHODS)}")
    if quantization == "fp8":
        return Fp8Config()
    if quantization == "int8":
        return Int8Config()
    if quantization == "compressed-tensors":
        raise ValueError("quantization='compressed-tensors' needs a checkpoint with that quantization_config")
    return None


def _checkpoint_names(model: nn.Module, name: str) -> list[str]:
    """The checkpoint modules a fused projection holds: model.layers.0.self_attn.qkv_proj -> q/k/v_proj."""
    packed = getattr(model, "packed_modules_mapping", {})
    prefix, _, leaf = name.rpartition(".")
    parts = [ckpt for ckpt, (ours, _) in packed.items() if ours == leaf]
    return [f"{prefix}.{p}" if prefix else p for p in parts] or [name]


def quantize_model(model: nn.Module, quant: QuantizationConfig) -> None:
    """Gives each projection its 8-bit method (MoE routers, ReplicatedLinear, stay in the model dtype; so do
    embeddings, norms and the LM head, which are no LinearBase)."""
    from mini_infer.layers.fused_moe import FusedMoE
    from mini_infer.layers.linear import LinearBase, ReplicatedLinear

    if any(isinstance(m, FusedMoE) for m in model.modules()):
        if not quant.online:
            raise ValueError(f"{quant.name} checkpoints of MoE models are not supported yet (8-bit experts)")
        logger.warning("quantization=%r: the MoE experts stay in the model dtype (8-bit experts: not yet)", quant.name)
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and not isinstance(module, ReplicatedLinear):
            method = quant.get_linear_method(_checkpoint_names(model, name))
            if method is not None:
                module.set_quant_method(method)


def process_weights_after_loading(model: nn.Module) -> None:
    """Online methods quantize their loaded weights here; checkpoint ones have nothing to do. Then the ops
    before per-token W8A8 projections learn to emit their input in 8 bits (fused_act_quant.py)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    fused = fuse_act_quant(model)
    if fused:
        logger.info("activation quantization fused into %d norm / SiLU-and-mul ops", fused)
