"""Qwen3-MoE, Mixtral and Qwen2-MoE against transformers: tiny random models written by save_pretrained
(so the loader reads the Hub's per-expert layout, and transformers' fused layout too), greedy tokens
identical and per-step logprobs within 1e-4, however the engine batches, chunks, caches or preempts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import STORIES, assert_matches_hf, hf_step_logprobs
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from mini_infer import LLM, SamplingParams
from mini_infer.layers.fused_moe import FusedMoE

STEPS = 16
BASE = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
CONFIGS = {
    # layer 1 dense through mlp_only_layers; routing weights renormalised
    "qwen3-moe": lambda: Qwen3MoeConfig(
        **BASE,
        head_dim=8,
        num_hidden_layers=3,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    # every layer sparse, 4 experts, top-2, float32 routing weights
    "mixtral": lambda: MixtralConfig(
        **BASE,
        num_hidden_layers=2,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=None,
    ),
    # decoder_sparse_step 2: layer 1 sparse, 0 and 2 dense; shared expert; no renormalisation; QKV bias
    "qwen2-moe": lambda: Qwen2MoeConfig(
        **BASE,
        num_hidden_layers=3,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        decoder_sparse_step=2,
    ),
}
# token ids of the stories260K vocabulary; prompts 2 and 3 share 20 tokens for the prefix cache
_gen = torch.Generator().manual_seed(1)
_shared = torch.randint(3, 512, (20,), generator=_gen).tolist()
PROMPTS = [torch.randint(3, 512, (n,), generator=_gen).tolist() for n in (7, 19, 1, 33)] + [
    _shared + [5, 6, 7],
    _shared + [9],
]


def _save_random(path: Path, config, original_format: bool = True) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init: logits far from uniform, routing far from ties
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    model.save_pretrained(path, save_original_format=original_format)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / f, path / f)
    return str(path)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def moe_model(request, tmp_path_factory) -> tuple[str, str]:
    return request.param, _save_random(tmp_path_factory.mktemp(request.param), CONFIGS[request.param]())


@pytest.fixture(scope="module")
def expected(moe_model) -> list[tuple[list[int], torch.Tensor]]:
    return [hf_step_logprobs(moe_model[1], p, STEPS) for p in PROMPTS]


PARAMS = SamplingParams(temperature=0, max_tokens=STEPS, logprobs=3, ignore_eos=True)


def _generate(llm: LLM, prompts=PROMPTS):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)


def test_checkpoint_layout(moe_model):
    """save_pretrained writes one tensor per expert (the Hub's layout), not transformers' fused one."""
    from safetensors import safe_open

    name, path = moe_model
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layer = 0 if name == "qwen3-moe" else 1  # (qwen3-moe's layer 1 is dense, qwen2-moe's 0)
    block, proj = ("block_sparse_moe", "w1") if name == "mixtral" else ("mlp", "gate_proj")
    expert = f"model.layers.{layer}.{block}.experts.3.{proj}.weight"
    assert expert in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)


def test_one_by_one(moe_model, expected):
    llm = LLM(moe_model[1], dtype="float32", enforce_eager=True)  # on_route runs in eager forwards only
    routed: list[torch.Tensor] = []
    layers = [m for m in llm.llm_engine.model_runner.model.modules() if isinstance(m, FusedMoE)]
    for layer in layers:
        layer.on_route = routed.append
    for prompt, exp in zip(PROMPTS, expected):
        assert_matches_hf(_generate(llm, [prompt]), [exp])
    # the random router spreads tokens over every expert: the comparison covers real routing
    assert len(torch.unique(torch.cat([ids.flatten() for ids in routed]))) == layers[0].num_experts


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched(moe_model, expected, prefix_caching):
    llm = LLM(moe_model[1], dtype="float32", enable_prefix_caching=prefix_caching)
    assert_matches_hf(_generate(llm), expected)
    again = _generate(llm)  # with caching on, the shared 16-token block comes from the cache
    assert_matches_hf(again, expected)
    stats = llm.llm_engine.stats
    assert (stats.prefix_cache_hits > 0) == prefix_caching
    assert stats.num_kv_blocks_used == 0


def test_chunked_prefill_tiny_budget(moe_model, expected):
    llm = LLM(moe_model[1], dtype="float32", max_num_batched_tokens=8, block_size=16)
    assert_matches_hf(_generate(llm), expected)


def test_preemption(moe_model, expected):
    # 4 blocks of 16 tokens cannot hold 6 sequences of up to 49 tokens at once
    llm = LLM(moe_model[1], dtype="float32", num_gpu_blocks_override=4, max_model_len=64)
    assert_matches_hf(_generate(llm), expected)
    assert llm.llm_engine.stats.num_preemptions > 0
    assert llm.llm_engine.stats.num_kv_blocks_used == 0


def test_fused_checkpoint_layout_loads(tmp_path, moe_model, expected):
    """transformers' own fused expert tensors (save_original_format=False) load to the same model."""
    name, _ = moe_model
    path = _save_random(tmp_path / "fused", CONFIGS[name](), original_format=False)
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in f.keys())
    assert_matches_hf(_generate(LLM(path, dtype="float32"), PROMPTS[:2]), expected[:2])


def test_static_graph_inputs_on_triton_kernels(tmp_path):
    """The fused MoE Triton kernels (interpreter) inside the CUDA-graph input path: padded decode batches
    take the GEMV path, prefill chunks the grouped GEMM, with experts that get no token. One architecture,
    Qwen2-MoE (top-3 without renormalisation, dense layers, shared expert), since the interpreter is slow;
    the kernel tests cover the rest."""
    path = _save_random(tmp_path / "qwen2-moe", CONFIGS["qwen2-moe"]())
    expected = [hf_step_logprobs(path, p, 6) for p in PROMPTS[:4]]
    llm = LLM(path, dtype="float32", kernel_backend="triton", max_num_batched_tokens=32, max_num_seqs=4)
    llm.llm_engine.model_runner.capture_cuda_graphs()
    graphs = llm.llm_engine.model_runner.graphs
    short = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    assert_matches_hf(llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:4]], short, use_tqdm=False), expected)
    assert graphs.prefill.num_replays > 0 and graphs.decode.num_replays > 0


@pytest.mark.parametrize(
    "preset,params",
    # the parameter counts their model cards publish (30.5B and 46.7B), to the parameter
    [("qwen3-30b-a3b", 30_532_122_624), ("mixtral-8x7b", 46_702_792_704)],
)
def test_preset_shapes(preset, params):
    from mini_infer.kernels import TORCH_OPS
    from mini_infer.model_loader import load_hf_config, preset_path
    from mini_infer.models import build_model

    with torch.device("meta"):  # shapes only, no memory
        model = build_model(load_hf_config(preset_path(preset)), TORCH_OPS)
    assert sum(p.numel() for p in model.parameters()) == params
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert len(layers) == model.config.num_hidden_layers
    w13 = layers[0].w13_weight
    assert (
        w13.shape[0] == (128 if preset == "qwen3-30b-a3b" else 8) and w13.shape[1] == 2 * layers[0].w2_weight.shape[2]
    )


def test_tiny_preset_runs_with_dummy_weights():
    llm = LLM("qwen3-moe-tiny", load_format="dummy", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 5, 5]
    experts = next(m for m in llm.llm_engine.model_runner.model.modules() if isinstance(m, FusedMoE))
    assert experts.w13_weight.abs().max() > 0  # dummy init reached the stacked expert tensors


def test_server_and_sampler(tmp_path):
    """The OpenAI server on a MoE model (Qwen2-MoE, shared expert): greedy and seeded sampled completions,
    streamed or not, equal offline generation's."""
    import openai
    from test_server import NUM_BLOCKS, ServerThread, _serve

    path = _save_random(tmp_path / "qwen2-moe", CONFIGS["qwen2-moe"]())
    offline = LLM(path, num_gpu_blocks_override=NUM_BLOCKS)
    prompts = ["Once upon a time", "The cat sat on the"]
    kinds = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=5)]
    expected = [
        [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(max_tokens=12, **k), use_tqdm=False)]
        for k in kinds
    ]
    engine, app = _serve(path, "moe")
    try:
        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for kind, texts in zip(kinds, expected):
                got = client.completions.create(model="moe", prompt=prompts, max_tokens=12, **kind)
                assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == texts
                stream = client.completions.create(model="moe", prompt=prompts[0], max_tokens=12, stream=True, **kind)
                assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == texts[0]
    finally:
        engine.shutdown()


def test_latency_bench_counts_the_experts_a_step_touches(tmp_path):
    """bench latency on a MoE preset: a batch-1 step touches exactly top-k experts per sparse layer, a larger
    batch more, and the step's bytes are those experts' weights plus the rest."""
    import json

    from mini_infer.bench.latency import main
    from mini_infer.bench.roofline import ModelShape
    from mini_infer.model_loader import preset_path

    out = tmp_path / "latency.json"
    args = ["--model", "qwen3-moe-tiny", "--load-format", "dummy", "--batch-sizes", "1,6", "--dtype", "float32"]
    with pytest.raises(SystemExit) as exit_code:
        main([*args, "--input-len", "8", "--output-len", "6", "--output-json", str(out), "--disable-tqdm"])
    assert exit_code.value.code == 0
    results = {r["batch_size"]: r for r in json.loads(out.read_text())["results"]}
    shape = ModelShape.from_hf_config(json.loads(preset_path("qwen3-moe-tiny").read_text()))
    assert results[1]["experts_touched_source"] == "measured per step"
    assert results[1]["mean_experts_touched"] == shape.num_sparse_layers * shape.experts_per_token
    assert 4 < results[6]["mean_experts_touched"] <= shape.num_sparse_layers * shape.num_experts
    kv = (8 + 1 + 8 + 5) / 2 * shape.kv_bytes_per_token(4)  # mean context over the 5 decode steps
    assert results[1]["mean_bytes_per_step"] == pytest.approx(shape.weight_bytes(4, 4) + kv)
