"""Qwen2-MoE: Qwen2's attention (QKV bias) and a sparse MLP block with a shared expert.

The block routes each token to its top-k experts (softmax, then top-k, renormalised only with
`norm_topk_prob`) and adds a shared expert that every token takes, scaled by a sigmoid gate of its
own. Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP.
Qwen3-MoE reuses this block without the shared expert (qwen3_moe.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mini_infer.kernels import KernelOps
from mini_infer.layers.fused_moe import QWEN_EXPERT_PROJECTIONS, FusedMoE, expert_checkpoint_target
from mini_infer.layers.linear import ReplicatedLinear
from mini_infer.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


def is_sparse_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    """transformers' rule for which layers of a Qwen MoE model are sparse."""
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0
    )


class Qwen2MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: KernelOps, shared_expert: bool = True) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.gate = ReplicatedLinear(hidden, config.num_experts, bias=False, ops=ops)
        self.experts = FusedMoE(
            config.num_experts,
            config.num_experts_per_tok,
            hidden,
            config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
            ops=ops,
        )
        self.has_shared_expert = shared_expert and bool(getattr(config, "shared_expert_intermediate_size", 0))
        if self.has_shared_expert:
            self.shared_expert = LlamaMLP(config, ops, config.shared_expert_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, bias=False, ops=ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: PretrainedConfig, ops: KernelOps, layer_idx: int) -> nn.Module:
        if is_sparse_layer(config, layer_idx):
            return Qwen2MoeSparseMoeBlock(config, ops)
        return LlamaMLP(config, ops)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer

    def map_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        """Expert tensors to the stacked expert parameters; None leaves a name to the packed mapping."""
        return expert_checkpoint_target(name, QWEN_EXPERT_PROJECTIONS)
