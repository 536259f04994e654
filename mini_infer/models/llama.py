"""Llama-family decoder (Llama 2/3, Mistral), and the base that Qwen2 and Qwen3 specialise.

Data path of one layer: fused add+RMSNorm -> fused QKV projection -> RoPE -> paged attention ->
output projection -> fused add+RMSNorm -> fused gate_up projection -> SiLU-and-mul -> down. Under per-token
W8A8 the two norms and SiLU-and-mul emit the next projection's 8-bit input themselves (a
QuantizedActivation; `quantized_input_pairs`, quantization/fused_act_quant.py).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mini_infer.kernels import KernelOps
from mini_infer.kernels.act_quant import QuantizedActivation
from mini_infer.layers.attention import PagedAttention
from mini_infer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mini_infer.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mini_infer.layers.rotary import build_cos_sin_cache


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: KernelOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps, self.ops = eps, ops
        self.output_quant_dtype: torch.dtype | None = None  # set at load: quantization/fused_act_quant.py

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | QuantizedActivation:
        """Without a residual: norm(x). With one: residual += x in place, then norm(residual). With
        output_quant_dtype, that norm quantized per token for the W8A8 projections that read it."""
        dtype = self.output_quant_dtype
        if dtype is not None:
            if residual is None:
                return self.ops.rms_norm_quant(x, self.weight, self.eps, dtype)
            return self.ops.fused_add_rms_norm_quant(x, residual, self.weight, self.eps, dtype)
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    """silu(gate) * up of the fused gate_up output; with output_quant_dtype, quantized per token."""

    def __init__(self, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops
        self.output_quant_dtype: torch.dtype | None = None  # set at load: quantization/fused_act_quant.py

    def forward(self, x: torch.Tensor) -> torch.Tensor | QuantizedActivation:
        if self.output_quant_dtype is None:
            return self.ops.silu_and_mul(x)
        return self.ops.silu_and_mul_quant(x, self.output_quant_dtype)


class LlamaAttention(nn.Module):
    qkv_bias = False
    qk_norm = False

    def __init__(self, config: PretrainedConfig, ops: KernelOps, cos_sin_cache: torch.Tensor) -> None:
        super().__init__()
        hidden = config.hidden_size
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        self.ops = ops
        bias = self.qkv_bias or getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False)
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, num_heads, num_kv_heads, bias=bias, ops=ops)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden, bias=False, ops=ops)
        self.cos_sin_cache = cos_sin_cache
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, ops)

    def input_projections(self) -> list[LinearBase]:
        """What reads this block's input: the fused QKV projection alone."""
        return [self.qkv_proj]

    def forward(self, positions: torch.Tensor, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        # q_norm/k_norm only hold the weights (checkpoint names): the attention's fused kernel applies them
        norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
        return self.o_proj(self.attn(positions, q, k, v, self.cos_sin_cache, *norm))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: KernelOps, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=False, ops=ops)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=False, ops=ops)
        self.act_fn = SiluAndMul(ops)
        self.ops = ops

    def input_projections(self) -> list[LinearBase]:
        """What reads this block's input: the fused gate_up projection alone."""
        return [self.gate_up_proj]

    def quantized_input_pairs(self) -> list[tuple[nn.Module, list[LinearBase]]]:
        return [(self.act_fn, [self.down_proj])]

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(
        self, config: PretrainedConfig, ops: KernelOps, cos_sin_cache: torch.Tensor, layer_idx: int = 0
    ) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, ops, cos_sin_cache)
        self.mlp = self.build_mlp(config, ops, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def build_mlp(self, config: PretrainedConfig, ops: KernelOps, layer_idx: int) -> nn.Module:
        """The MLP of layer `layer_idx`; mixture-of-experts models pick a sparse block for some layers."""
        return LlamaMLP(config, ops)

    def quantized_input_pairs(self) -> list[tuple[nn.Module, list[LinearBase]]]:
        """Each norm and the projections that alone read its output, where the block after it names them
        (`input_projections`; a sparse MoE block or MLA attention does not: their inputs stay unquantized)."""
        blocks = ((self.input_layernorm, self.self_attn), (self.post_attention_layernorm, self.mlp))
        return [(norm, block.input_projections()) for norm, block in blocks if hasattr(block, "input_projections")]

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x.clone()
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, ops: KernelOps, layer_cls: type[LlamaDecoderLayer]) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache = build_cos_sin_cache(config, head_dim, config.max_position_embeddings)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, ops, cache, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.aux_layers: tuple[int, ...] = ()  # an EAGLE-3 head reads the residual stream entering these

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | tuple:
        """The final hidden states; with aux_layers, also the residual stream entering those layers,
        concatenated (an EAGLE-3 head's input)."""
        x, residual, aux = self.embed_tokens(input_ids), None, []
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                aux += [x if residual is None else x + residual] * self.aux_layers.count(i)
            x, residual = layer(positions, x, residual)
        hidden = self.norm(x, residual)
        return (hidden, torch.cat(aux, dim=-1)) if self.aux_layers else hidden


class LlamaForCausalLM(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer
    # checkpoint name -> (our parameter name, shard id) for the fused projections
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig, ops: KernelOps) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ops, self.layer_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ops)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's architecture; its sliding window is not applied (full attention)."""
