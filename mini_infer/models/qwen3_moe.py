"""Qwen3-MoE: Qwen3's attention (q/k RMSNorm) and Qwen2-MoE's sparse block without a shared expert."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from mini_infer.kernels import KernelOps
from mini_infer.models.llama import LlamaMLP
from mini_infer.models.qwen2_moe import (
    Qwen2MoeDecoderLayer,
    Qwen2MoeForCausalLM,
    Qwen2MoeSparseMoeBlock,
    is_sparse_layer,
)
from mini_infer.models.qwen3 import Qwen3Attention


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    attention_cls = Qwen3Attention

    def build_mlp(self, config: PretrainedConfig, ops: KernelOps, layer_idx: int) -> nn.Module:
        if is_sparse_layer(config, layer_idx):
            return Qwen2MoeSparseMoeBlock(config, ops, shared_expert=False)
        return LlamaMLP(config, ops)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
