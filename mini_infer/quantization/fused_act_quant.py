"""Activation quantization fused into the op before a W8A8 projection.

A per-token W8A8 projection first quantizes its input (kernels/act_quant.py): a launch of its own, or in
the one-row GEMV each program redoing the row. Where that input is the output of an RMSNorm, a fused
add+RMSNorm or SiLU-and-mul which nothing else reads, the op can emit the 8-bit values and the per-token
scales itself (kernels/rmsnorm.py, kernels/activation.py: `*_quant`): one launch fewer per projection, and
the activation is written in 8 bits and read once, not written in the model dtype and read twice. The
residual stream stays in the model dtype.

Models name those places: a module's `quantized_input_pairs()` lists (op, the projections that alone read
its output); Llama's decoder layer gives input_layernorm -> qkv_proj and post_attention_layernorm ->
gate_up_proj, its MLP act_fn -> down_proj. `fuse_act_quant` sets an op's `output_quant_dtype` when all its
projections take a pre-quantized input of one dtype (`input_quant_dtype` of their linear method:
W8A8LinearMethod with channel scales; not block FP8, unquantized layers or LoRA's wrapper), and clears it
otherwise. It runs after the weights load and again after anything that swaps a projection's method (the
LoRA manager's wrappers). The projection then gets a QuantizedActivation and skips its own quantization.

The fused op computes the same values: the op's output rounded to its dtype, then act_quant's float32 steps
(shared Triton helpers on the GPU, act_quant_ref itself in the torch set), so tokens and logprobs are the
same with or without it (tests/test_fused_act_quant.py). MINI_INFER_FUSE_ACT_QUANT=0 turns it off, for A/B
runs (benchmarks/quant_decode.py --act-quant).
"""

from __future__ import annotations

import os

import torch
from torch import nn

FUSE_ENV = "MINI_INFER_FUSE_ACT_QUANT"


def fused_act_quant_enabled() -> bool:
    return os.environ.get(FUSE_ENV, "1") != "0"


def input_quant_dtype(linear: nn.Module) -> torch.dtype | None:
    """The dtype in which this projection takes its input pre-quantized per token, or None."""
    return getattr(linear.quant_method, "input_quant_dtype", None)


def fuse_act_quant(model: nn.Module) -> int:
    """Decides, from the projections' methods now, which ops emit their output in 8 bits; returns how many."""
    enabled, fused = fused_act_quant_enabled(), 0
    for module in model.modules():
        pairs = getattr(module, "quantized_input_pairs", None)
        for op, linears in pairs() if pairs is not None else ():
            dtypes = {input_quant_dtype(linear) for linear in linears}
            dtype = dtypes.pop() if enabled and len(dtypes) == 1 else None
            op.output_quant_dtype = dtype
            fused += dtype is not None
    return fused
