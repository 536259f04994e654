"""Mixtral: Mistral's attention and a sparse MLP block in every layer.

The router always renormalises its top-k and keeps the weights in float32 (transformers'
MixtralTopKRouter does not round them to the model dtype, unlike Qwen's). The Hub names the block
`block_sparse_moe` and the experts' projections w1 (gate), w3 (up), w2 (down); transformers renames
the block `mlp`, as this model does, so both spellings load.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mini_infer.kernels import KernelOps
from mini_infer.layers.fused_moe import MIXTRAL_EXPERT_PROJECTIONS, FusedMoE, expert_checkpoint_target
from mini_infer.layers.linear import ReplicatedLinear
from mini_infer.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: KernelOps) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, config.num_local_experts, bias=False, ops=ops)
        self.experts = FusedMoE(
            config.num_local_experts,
            config.num_experts_per_tok,
            config.hidden_size,
            config.intermediate_size,
            renormalize=True,
            ops=ops,
            round_weights=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class MixtralDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: PretrainedConfig, ops: KernelOps, layer_idx: int) -> nn.Module:
        return MixtralSparseMoeBlock(config, ops)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mistral's sliding window is not applied (full attention), as in MistralForCausalLM."""

    layer_cls = MixtralDecoderLayer

    def map_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if target := expert_checkpoint_target(name, MIXTRAL_EXPERT_PROJECTIONS):
            return target
        return (name, None) if ".mlp.gate." in name else None
