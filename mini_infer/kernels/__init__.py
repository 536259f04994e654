"""Kernels: Triton kernels and the plain PyTorch references they are tested against.

A kernel's reference sits in its file, except for the two attention kernels (prefill_attention.py,
decode_attention.py), whose references share their block-table gather in paged_attention.py.
_triton.py holds the optional Triton import and the helpers the kernels share, triton_ops.py the
Triton set.

`get_ops(backend)` returns the set the model uses: "torch" (the references, the CPU path; its attention
is the references' arithmetic batched over sequences, see paged_attention.py) or "triton". The model
and attention layers call only through a `KernelOps`, so switching backend never touches model code.
"""

from collections.abc import Callable
from dataclasses import dataclass

from mini_infer.kernels.activation import silu_and_mul_quant_ref, silu_and_mul_ref
from mini_infer.kernels.fused_moe import fused_experts_ref
from mini_infer.kernels.gemv import linear_ref
from mini_infer.kernels.lora import lora_expand_torch, lora_shrink_torch
from mini_infer.kernels.moe_routing import moe_topk_ref
from mini_infer.kernels.paged_attention import decode_attention_batched, prefill_attention_batched
from mini_infer.kernels.rmsnorm import (
    fused_add_rms_norm_quant_torch,
    fused_add_rms_norm_torch,
    rms_norm_quant_torch,
    rms_norm_torch,
)
from mini_infer.kernels.rotary_store import rotary_store_kv_ref


@dataclass(frozen=True)
class KernelOps:
    name: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    silu_and_mul: Callable
    # the three above with their output quantized per token for a W8A8 projection: quantization/fused_act_quant.py
    rms_norm_quant: Callable
    fused_add_rms_norm_quant: Callable
    silu_and_mul_quant: Callable
    rotary_store_kv: Callable
    prefill_attention: Callable
    decode_attention: Callable
    linear: Callable
    moe_topk: Callable  # router logits -> (weights, expert ids): moe_routing.py
    fused_experts: Callable  # the experts' SwiGLU for routed tokens: fused_moe.py
    lora_shrink: Callable  # x @ A[slot].T per token (LoRA): lora.py
    lora_expand: Callable  # y += s @ B[slot].T per token and slice, in place (LoRA): lora.py


TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_torch,
    fused_add_rms_norm=fused_add_rms_norm_torch,
    silu_and_mul=silu_and_mul_ref,
    rms_norm_quant=rms_norm_quant_torch,
    fused_add_rms_norm_quant=fused_add_rms_norm_quant_torch,
    silu_and_mul_quant=silu_and_mul_quant_ref,
    rotary_store_kv=rotary_store_kv_ref,
    prefill_attention=prefill_attention_batched,
    decode_attention=decode_attention_batched,
    linear=linear_ref,
    moe_topk=moe_topk_ref,
    fused_experts=fused_experts_ref,
    lora_shrink=lora_shrink_torch,
    lora_expand=lora_expand_torch,
)


def get_ops(backend: str) -> KernelOps:
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        from mini_infer.kernels.triton_ops import TRITON_OPS

        return TRITON_OPS
    raise ValueError(f"kernel_backend must be 'torch' or 'triton', got {backend!r}")
