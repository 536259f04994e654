"""Activation quantization fused into the norms and SiLU-and-mul (quantization/fused_act_quant.py): which
ops emit 8-bit values, and that the engine's tokens and logprobs are the same with the fusion as without.

Equal, not close: on CPU the torch set's fused ops are the unfused path's own two steps (the op, then
act_quant_ref) and the projection then skips its act_quant_ref, so the arithmetic is the same, bit for bit;
the Triton kernels give the unfused kernels' bits (tests/test_quant_kernels.py). The switch is
MINI_INFER_FUSE_ACT_QUANT=0, read when the weights load.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, STORIES
from transformers import LlamaConfig

from mini_infer import LLM, SamplingParams
from mini_infer.kernels import TORCH_OPS
from mini_infer.kernels.act_quant import QuantizedActivation
from mini_infer.lora.layers import LoRALinearMethod
from mini_infer.model_loader import load_model
from mini_infer.quantization.fused_act_quant import FUSE_ENV, fuse_act_quant

SCHEMES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
PARAMS = SamplingParams(max_tokens=12, temperature=0, logprobs=3)


def fused_ops(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: m.output_quant_dtype for n, m in model.named_modules() if getattr(m, "output_quant_dtype", None)}


def outputs(llm: LLM, prompts=PROMPTS[:4], params=PARAMS) -> list:
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [
        (o.outputs[0].token_ids, [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs]) for o in outs
    ]


def watch_inputs(model: torch.nn.Module) -> list[tuple[str, type]]:
    """Records (projection, the type of its input) on every call."""
    seen = []
    for name, module in model.named_modules():
        if hasattr(module, "quant_method"):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, type(args[0]))))
    return seen


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_same_tokens_and_logprobs_with_and_without_fusion(scheme, monkeypatch):
    fused = LLM(str(STORIES), quantization=scheme, enforce_eager=True)
    model = fused.llm_engine.model_runner.model
    layers = len(model.model.layers)
    expected = {
        f"model.layers.{i}.{op}": SCHEMES[scheme]
        for i in range(layers)
        for op in ("input_layernorm", "post_attention_layernorm", "mlp.act_fn")
    }
    assert fused_ops(model) == expected  # the final norm feeds the LM head, which stays in the model dtype
    seen = watch_inputs(model)
    with_fusion = outputs(fused)
    # every call of qkv, gate_up and down got the 8-bit pair; o_proj (after attention) the tensor
    assert len(seen) >= 4 * layers
    for name, kind in seen:
        assert kind is (torch.Tensor if name.endswith("o_proj") else QuantizedActivation), name
    monkeypatch.setenv(FUSE_ENV, "0")
    unfused = LLM(str(STORIES), quantization=scheme, enforce_eager=True)
    assert fused_ops(unfused.llm_engine.model_runner.model) == {}
    assert outputs(unfused) == with_fusion


def test_same_prompt_logprobs_with_and_without_fusion(monkeypatch):
    """Every prompt position (prompt_logprobs), prefills chunked at 16 tokens and batched with decodes:
    int8, fused against unfused."""
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2)

    def run() -> list:
        llm = LLM(str(STORIES), quantization="int8", enforce_eager=True, max_num_batched_tokens=16)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        return [
            [None if d is None else {t: lp.logprob for t, lp in d.items()} for d in o.prompt_logprobs] for o in outs
        ]

    fused = run()
    monkeypatch.setenv(FUSE_ENV, "0")
    assert run() == fused


def test_triton_kernels_same_tokens_with_and_without_fusion(monkeypatch):
    """kernel_backend="triton" (the interpreter on CPU): the fused Triton norms and SiLU-and-mul against the
    unfused Triton ops followed by the projection's own quantization."""
    kwargs = dict(quantization="fp8", kernel_backend="triton", enforce_eager=True, max_num_batched_tokens=64)
    short = SamplingParams(max_tokens=3, temperature=0, logprobs=2)
    llm = LLM(str(STORIES), **kwargs)
    assert len(fused_ops(llm.llm_engine.model_runner.model)) == 15
    fused = outputs(llm, PROMPTS[:1], short)
    monkeypatch.setenv(FUSE_ENV, "0")
    assert outputs(LLM(str(STORIES), **kwargs), PROMPTS[:1], short) == fused


def test_unquantized_model_fuses_nothing():
    assert fused_ops(LLM(str(STORIES), enforce_eager=True).llm_engine.model_runner.model) == {}


def _tiny_llama(**quantization_config) -> LlamaConfig:
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    if quantization_config:
        config.quantization_config = quantization_config
    return config


def _load(config, quantization: str | None = None) -> torch.nn.Module:
    return load_model(Path("unused"), config, TORCH_OPS, torch.float32, torch.device("cpu"), "dummy", 0, quantization)


def test_block_fp8_fuses_nothing():
    """Block scales want one activation scale per token and 32-column group; the fused ops make one per token."""
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [32, 32]}
    assert fused_ops(_load(_tiny_llama(**qc))) == {}


def test_lora_wrapped_projections_take_the_model_dtype_input():
    """LoRA's shrink reads the projection's input as it is: fuse_act_quant after the wrap (the LoRA manager
    calls it) stops the ops feeding a wrapped projection, and only those."""
    model = _load(_tiny_llama(), "int8")
    assert len(fused_ops(model)) == 6
    qkv = model.model.layers[0].self_attn.qkv_proj
    qkv.quant_method = LoRALinearMethod(qkv.quant_method, [64, 32, 32], 64, 1, 4, torch.float32, "cpu", TORCH_OPS)
    assert fuse_act_quant(model) == 5
    assert "model.layers.0.input_layernorm" not in fused_ops(model)


def test_lora_engine_fuses_nothing():
    llm = LLM(str(STORIES), quantization="fp8", enforce_eager=True, enable_lora=True, max_lora_rank=8)
    assert fused_ops(llm.llm_engine.model_runner.model) == {}


def test_moe_layers_keep_the_norm_before_the_experts_unquantized(monkeypatch):
    """Qwen3-MoE (every layer sparse): only input_layernorm -> qkv fuses; the norm before the sparse block
    feeds the router and the experts, which read the model dtype. Same tokens either way."""
    kwargs = dict(load_format="dummy", dtype="float32", quantization="fp8", enforce_eager=True)
    prompts = [{"prompt_token_ids": [1, 5, 9, 200, 7]}, {"prompt_token_ids": [3, 4]}]
    llm = LLM("qwen3-moe-tiny", **kwargs)
    model = llm.llm_engine.model_runner.model
    assert set(fused_ops(model)) == {f"model.layers.{i}.input_layernorm" for i in range(len(model.model.layers))}
    fused = outputs(llm, prompts)
    monkeypatch.setenv(FUSE_ENV, "0")
    assert outputs(LLM("qwen3-moe-tiny", **kwargs), prompts) == fused
