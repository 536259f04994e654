"""DeepSeek-V2 and V3: multi-head latent attention (MLA) and a routed + shared expert MLP.

Attention: the query comes from q_proj, or (q_lora_rank set) q_a_proj → RMSNorm → q_b_proj, split into
a no-rope part and a rope part per head. kv_a_proj_with_mqa makes one latent per token, kv_c (RMSNorm'd)
‖ k_pe (rotated, shared by all heads), which is all the cache keeps (attention/mla.py). kv_b_proj's
weight [H·(nope + v), R] holds W_UK and W_UV: the query's nope part goes through W_UK into latent space
before attention, the output through W_UV after it. YaRN's mscale_all_dim scales the softmax.

MLP: the first `first_k_dense_replace` layers are dense; the others route each token to top-k experts
(layers/grouped_topk.py: V2's softmax greedy or group-limited, V3's biased sigmoid over groups) and add
shared experts that every token takes. V3's multi-token-prediction layer (layer index
num_hidden_layers in the checkpoint) is not used for generation; its weights are skipped.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers import PretrainedConfig

from mini_infer.attention.mla import MLAAttention
from mini_infer.distributed import get_tp_rank, get_tp_size
from mini_infer.distributed.communication_op import tensor_model_parallel_all_reduce
from mini_infer.kernels import KernelOps
from mini_infer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mini_infer.layers.fused_moe import QWEN_EXPERT_PROJECTIONS, FusedMoE, expert_checkpoint_target
from mini_infer.layers.grouped_topk import deepseek_v2_topk, deepseek_v3_topk
from mini_infer.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from mini_infer.layers.mla_rotary import apply_mla_rope, build_mla_cos_sin_cache
from mini_infer.layers.rotary import rope_parameters
from mini_infer.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel, RMSNorm

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def mla_softmax_scale(config: PretrainedConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under a scaled rope (YaRN)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    p = rope_parameters(config)
    mscale_all_dim = p.get("mscale_all_dim", 0)
    if p["rope_type"] != "default" and mscale_all_dim and p["factor"] > 1:
        mscale = 0.1 * mscale_all_dim * math.log(p["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


class KVUpProjection(nn.Module):
    """kv_b_proj's weight, this rank's heads only: attention never multiplies by it as one matrix (its
    W_UK and W_UV halves are absorbed around the attention), so it is no linear layer, and quantizing the
    model's projections leaves it in the model dtype."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank()
        rows = out_features // get_tp_size()
        self.weight = nn.Parameter(torch.empty(rows, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))


class DeepseekV2Attention(nn.Module):
    reads_rope_interleave = False  # V2 always rotates interleaved pairs; V3 reads `rope_interleave`

    def __init__(self, config: PretrainedConfig, ops: KernelOps, cos_sin_cache: torch.Tensor) -> None:
        super().__init__()
        hidden, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = config.kv_lora_rank, config.q_lora_rank
        self.num_heads = config.num_attention_heads // get_tp_size()
        qk_dim = self.nope + self.rope
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, config.num_attention_heads * qk_dim, ops=ops)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias, ops=ops)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6, ops)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, config.num_attention_heads * qk_dim, ops=ops)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope, bias=bias, ops=ops)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6, ops)
        self.kv_b_proj = KVUpProjection(self.kv_lora_rank, config.num_attention_heads * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.v_dim, hidden, bias=bias, ops=ops)
        self.interleave = bool(getattr(config, "rope_interleave", True)) if self.reads_rope_interleave else True
        self.cos_sin_cache = cos_sin_cache
        self.attn = MLAAttention(self.num_heads, self.kv_lora_rank, self.rope, mla_softmax_scale(config), ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T, H = x.shape[0], self.num_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(T, H, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c.contiguous())
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        q_pe = apply_mla_rope(q_pe, cos_sin, self.interleave)
        k_pe = apply_mla_rope(k_pe, cos_sin, self.interleave)
        w_kv = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv[:, : self.nope], w_kv[:, self.nope :]  # [H, nope, R], [H, v, R]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, R]
        out = self.attn(positions, q_latent, q_pe, kv_c, k_pe)  # [T, H, R]
        out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, v]
        return self.o_proj(out.reshape(T, H * self.v_dim))


class DeepseekV3Attention(DeepseekV2Attention):
    reads_rope_interleave = True


class DeepseekRouter(nn.Module):
    """The router's weight in float32, as transformers keeps it (`gate.weight`), and V3's correction bias."""

    def __init__(self, config: PretrainedConfig, v3: bool) -> None:
        super().__init__()
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=torch.float32), requires_grad=False)
        if v3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32), requires_grad=False)
        self.v3, self.top_k = v3, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scaling = float(config.routed_scaling_factor)
        self.method = getattr(config, "topk_method", "greedy")
        self.renormalize = bool(getattr(config, "norm_topk_prob", False))
        grouped = v3 or self.method == "group_limited_greedy"
        if not v3 and self.method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method {self.method!r} is not supported (greedy, group_limited_greedy)")
        if grouped and not (self.n_group and E % self.n_group == 0 and 0 < (self.topk_group or 0) <= self.n_group):
            raise ValueError(
                f"grouped routing needs n_group dividing n_routed_experts={E} and 0 < topk_group <= n_group, "
                f"got n_group={self.n_group}, topk_group={self.topk_group}"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(x.float(), self.weight)
        if self.v3:
            return deepseek_v3_topk(
                logits,
                self.e_score_correction_bias,
                self.top_k,
                self.n_group,
                self.topk_group,
                self.renormalize,
                self.scaling,
            )
        return deepseek_v2_topk(logits, self.top_k, self.method, self.n_group, self.topk_group, self.scaling)


class DeepseekMoE(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: KernelOps, v3: bool) -> None:
        super().__init__()
        self.gate = DeepseekRouter(config, v3)
        self.experts = FusedMoE(
            config.n_routed_experts,
            config.num_experts_per_tok,
            config.hidden_size,
            config.moe_intermediate_size,
            renormalize=False,
            ops=ops,
        )
        self.shared_experts = LlamaMLP(config, ops, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FusedMoE.forward with DeepSeek's router in place of its softmax top-k."""
        weights, ids = self.gate(x)
        experts = self.experts
        if experts.on_route is not None:
            experts.on_route(ids)
        if experts.expert_parallel:  # slots of other ranks' experts: weight 0 on a local expert
            local = ids - experts.expert_start
            outside = (local < 0) | (local >= experts.num_local_experts)
            ids, weights = local.masked_fill(outside, 0), weights.masked_fill(outside, 0)
        out = experts.ops.fused_experts(x, experts.w13_weight, experts.w2_weight, weights, ids)
        if experts.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out + self.shared_experts(x)


class DeepseekV2DecoderLayer(LlamaDecoderLayer):
    attention_cls = DeepseekV2Attention
    v3 = False

    def build_mlp(self, config: PretrainedConfig, ops: KernelOps, layer_idx: int) -> nn.Module:
        if layer_idx >= getattr(config, "first_k_dense_replace", 0):
            return DeepseekMoE(config, ops, self.v3)
        return LlamaMLP(config, ops)


class DeepseekV3DecoderLayer(DeepseekV2DecoderLayer):
    attention_cls = DeepseekV3Attention
    v3 = True


class DeepseekV2Model(LlamaModel):
    """LlamaModel with the rope cache on the qk_rope_head_dim slice (any rope type, YaRN included)."""

    def __init__(self, config: PretrainedConfig, ops: KernelOps, layer_cls: type[LlamaDecoderLayer]) -> None:
        nn.Module.__init__(self)
        cache = build_mla_cos_sin_cache(config, config.qk_rope_head_dim, config.max_position_embeddings)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, ops, cache, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.aux_layers: tuple[int, ...] = ()


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    layer_cls = DeepseekV2DecoderLayer
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: PretrainedConfig, ops: KernelOps) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.model = DeepseekV2Model(config, ops, self.layer_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ops)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def map_checkpoint_name(self, name: str) -> tuple[str, object] | None:
        return expert_checkpoint_target(name, QWEN_EXPERT_PROJECTIONS)

    def ignore_checkpoint_name(self, name: str) -> bool:
        """V3's multi-token-prediction layer sits after the last decoder layer; generation never runs it."""
        match = _LAYER.match(name)
        return match is not None and int(match[1]) >= self.config.num_hidden_layers

    def attention_layers(self) -> list[MLAAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    layer_cls = DeepseekV3DecoderLayer
