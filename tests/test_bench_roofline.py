"""Roofline arithmetic against values worked out by hand, and the presets against published sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mini_infer.bench.roofline import (
    Hardware,
    ModelShape,
    decode_step_cost,
    ideal_workload_time,
    measure_hbm_bandwidth,
    measure_tensor_peak,
)

PRESETS = Path(__file__).resolve().parent.parent / "mini_infer" / "presets"

# tiny-llama: hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, intermediate 128, vocab 512, untied.
#   per layer: q 64*64 + k,v 2*64*32 + o 64*64 = 12288, mlp 3*64*128 = 24576 -> 36864 linear, 128 norm
#   total = 2*(36864+128) + embed 32768 + lm_head 32768 + final norm 64 = 139584
#   read per step = 2*36992 + 64 + 32768 = 106816 (embedding table not streamed)
#   matmul params = 2*36864 + 32768 = 106496
TINY = ModelShape.from_hf_config(json.loads((PRESETS / "tiny-llama.json").read_text()))


def test_tiny_llama_counts_by_hand():
    assert TINY.layer_linear_params == 36864
    assert TINY.total_params == 139584
    assert TINY.params_read_per_step == 106816
    assert TINY.matmul_params == 106496
    assert TINY.weight_bytes(4) == 427264
    assert TINY.kv_bytes_per_token(4) == 2 * 2 * 32 * 4  # K and V, 2 layers, 2 heads x 16, fp32
    assert TINY.attention_flops(10) == 4 * 2 * 64 * 10
    # prefill of 3 tokens: 2*2*36864*3 linear + lm_head once 2*32768 + attention over 1+2+3 pairs
    assert TINY.prefill_flops(3) == 442368 + 65536 + 4 * 2 * 64 * 6


@pytest.mark.parametrize(
    "name, params, read_per_step",
    [
        # published parameter counts; Qwen3-0.6B ties its lm_head, so every stored weight is read.
        ("qwen3-0.6b", 596_049_920, 596_049_920),
        ("llama-3-8b", 8_030_261_248, 8_030_261_248 - 128256 * 4096),
        ("qwen3-8b", 8_190_735_360, 8_190_735_360 - 151936 * 4096),
    ],
)
def test_preset_parameter_counts(name, params, read_per_step):
    shape = ModelShape.from_hf_config(json.loads((PRESETS / f"{name}.json").read_text()))
    assert shape.total_params == params
    assert shape.params_read_per_step == read_per_step


def test_llama3_8b_preset_shape():
    config = json.loads((PRESETS / "llama-3-8b.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["vocab_size"] == 128256
    assert config["num_key_value_heads"] == 8 and config["torch_dtype"] == "bfloat16"
    shape = ModelShape.from_hf_config(config)
    assert shape.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2  # 128 KiB per token in bf16


def test_decode_step_cost_by_hand():
    cost = decode_step_cost(TINY, [4, 6], dtype_bytes=4)
    assert cost.bytes == 427264 + 10 * 512
    assert cost.flops == 2 * 2 * 106496 + 4 * 2 * 64 * 10
    memory_bound = Hardware(hbm_bytes_per_s=1e6, peak_flops=1e12)
    assert cost.ideal_seconds(memory_bound) == pytest.approx(cost.bytes / 1e6)
    compute_bound = Hardware(hbm_bytes_per_s=1e15, peak_flops=1e6)
    assert cost.ideal_seconds(compute_bound) == pytest.approx(cost.flops / 1e6)


def test_ideal_single_request_by_hand():
    hw = Hardware(hbm_bytes_per_s=1e6, peak_flops=1e9)
    est = ideal_workload_time(TINY, hw, [(3, 3)], max_num_seqs=1, dtype_bytes=4)
    # prefill yields token 1; decode steps attend to 3+1 and 3+2 tokens; memory-bound at 1 MB/s.
    assert est.decode_steps == 2
    assert est.prefill_seconds == pytest.approx(510976 / 1e9)
    assert est.decode_bytes == 2 * 427264 + (4 + 5) * 512
    assert est.decode_seconds == pytest.approx((427264 + 4 * 512) / 1e6 + (427264 + 5 * 512) / 1e6)
    assert est.memory_bound_steps == 2
    assert est.seconds == pytest.approx(est.prefill_seconds + est.decode_seconds)


def test_ideal_batches_like_continuous_batching():
    hw = Hardware(hbm_bytes_per_s=1e6, peak_flops=1e15)
    requests = [(3, 3), (3, 2), (5, 1)]
    one_at_a_time = ideal_workload_time(TINY, hw, requests, max_num_seqs=1, dtype_bytes=4)
    together = ideal_workload_time(TINY, hw, requests, max_num_seqs=8, dtype_bytes=4)
    # one at a time: 2 + 1 + 0 decode steps; together: step 1 has both, step 2 only the first.
    assert one_at_a_time.decode_steps == 3
    assert together.decode_steps == 2
    assert together.decode_bytes == 2 * 427264 + (4 + 4 + 5) * 512
    assert one_at_a_time.decode_bytes == 3 * 427264 + (4 + 5 + 4) * 512
    assert together.prefill_flops == one_at_a_time.prefill_flops == 2 * 510976 + TINY.prefill_flops(5)
    assert together.seconds < one_at_a_time.seconds


def test_ideal_compute_bound_steps():
    hw = Hardware(hbm_bytes_per_s=1e15, peak_flops=1e3)
    est = ideal_workload_time(TINY, hw, [(4, 3)] * 2, max_num_seqs=2, dtype_bytes=2)
    assert est.memory_bound_steps == 0
    assert est.decode_seconds == pytest.approx(est.decode_flops / 1e3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measurements_are_plausible():
    assert 1e11 < measure_hbm_bandwidth(size_bytes=1 << 28, iters=5) < 2e13
    assert 1e12 < measure_tensor_peak(n=4096, iters=5) < 5e15


# qwen3-moe-tiny: hidden 64, 2 sparse layers, 4 heads, 2 kv heads, head_dim 16, 8 experts of 32, top-2, vocab 512.
#   attention 64*(64+2*32) + 64*64 = 12288; one expert 3*64*32 = 6144; router 8*64 = 512
#   outside the experts 2*12288 + 2*512 = 25600; norms per layer 2*64 + 2*16 (q/k norm) = 160
#   total = 32768 + 25600 + 16*6144 + 2*160 + 64 + 32768 = 189824
MOE_TINY = ModelShape.from_hf_config(json.loads((PRESETS / "qwen3-moe-tiny.json").read_text()))


def test_moe_counts_by_hand():
    assert (MOE_TINY.num_experts, MOE_TINY.experts_per_token, MOE_TINY.num_sparse_layers) == (8, 2, 2)
    assert MOE_TINY.expert_params == 6144
    assert MOE_TINY.total_params == 189824
    assert MOE_TINY.params_read(3) == 25600 + 3 * 6144 + 320 + 64 + 32768
    assert MOE_TINY.params_read_per_step == 25600 + 16 * 6144 + 320 + 64 + 32768  # every expert
    assert MOE_TINY.matmul_params == 25600 + 2 * 2 * 6144 + 32768  # each token multiplies 2 experts per layer
    assert MOE_TINY.expected_experts_touched(1) == pytest.approx(4)  # one token: exactly top-2 in 2 layers
    assert MOE_TINY.expected_experts_touched(10**4) == pytest.approx(16)  # a large batch touches them all
    fp8_kv = decode_step_cost(MOE_TINY, [5], dtype_bytes=2, experts_touched=4, kv_dtype_bytes=1)
    cost = decode_step_cost(MOE_TINY, [5], dtype_bytes=2, experts_touched=4)
    assert cost.bytes - fp8_kv.bytes == 5 * MOE_TINY.kv_bytes_per_token(1)  # an fp8 pool: half the KV bytes
    assert cost.bytes == 2 * (25600 + 4 * 6144 + 320 + 64 + 32768) + 5 * MOE_TINY.kv_bytes_per_token(2)
    assert decode_step_cost(MOE_TINY, [5], dtype_bytes=2).bytes == cost.bytes  # the estimate is exact at batch 1


@pytest.mark.parametrize(
    "name, params", [("qwen3-30b-a3b", 30_532_122_624), ("mixtral-8x7b", 46_702_792_704)]
)  # the published parameter counts (tests/test_moe_models.py checks the built models against them too)
def test_moe_preset_parameter_counts(name, params):
    assert ModelShape.from_hf_config(json.loads((PRESETS / f"{name}.json").read_text())).total_params == params


def test_moe_shapes_of_dense_and_shared_expert_layers():
    """Qwen2-MoE with a shared expert and decoder_sparse_step 2: the shape's total equals the model's."""
    from transformers import Qwen2MoeConfig

    from mini_infer.kernels import TORCH_OPS
    from mini_infer.models import build_model

    config = Qwen2MoeConfig(
        vocab_size=512, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3,
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=3, decoder_sparse_step=2, tie_word_embeddings=False, architectures=["Qwen2MoeForCausalLM"],
    )  # fmt: skip
    shape = ModelShape.from_hf_config(config)
    assert shape.num_sparse_layers == 1 and shape.attention_bias
    with torch.device("meta"):
        model = build_model(config, TORCH_OPS)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
