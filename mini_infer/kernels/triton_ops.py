"""The Triton kernel set, selected by get_ops("triton")."""

from mini_infer.kernels import KernelOps
from mini_infer.kernels._triton import require_triton
from mini_infer.kernels.activation import silu_and_mul_quant_triton, silu_and_mul_triton
from mini_infer.kernels.decode_attention import decode_attention_triton
from mini_infer.kernels.fused_moe import fused_experts_triton
from mini_infer.kernels.gemv import linear_triton
from mini_infer.kernels.lora import lora_expand_tiled, lora_shrink_tiled
from mini_infer.kernels.moe_routing import moe_topk_triton
from mini_infer.kernels.prefill_attention import prefill_attention_triton
from mini_infer.kernels.rmsnorm import (
    fused_add_rms_norm_quant_triton,
    fused_add_rms_norm_triton,
    rms_norm_quant_triton,
    rms_norm_triton,
)
from mini_infer.kernels.rotary_store import rotary_store_kv_triton

require_triton()

TRITON_OPS = KernelOps(
    name="triton",
    rms_norm=rms_norm_triton,
    fused_add_rms_norm=fused_add_rms_norm_triton,
    silu_and_mul=silu_and_mul_triton,
    rms_norm_quant=rms_norm_quant_triton,
    fused_add_rms_norm_quant=fused_add_rms_norm_quant_triton,
    silu_and_mul_quant=silu_and_mul_quant_triton,
    rotary_store_kv=rotary_store_kv_triton,
    prefill_attention=prefill_attention_triton,
    decode_attention=decode_attention_triton,
    linear=linear_triton,
    moe_topk=moe_topk_triton,
    fused_experts=fused_experts_triton,
    lora_shrink=lora_shrink_tiled,
    lora_expand=lora_expand_tiled,
)
