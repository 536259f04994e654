"""DeepSeek-V2 and V3 (MLA) against transformers: tiny random models written by save_pretrained, fp32.

transformers expands the latent into per-head K/V; mini-infer attends in latent space with W_UK and
W_UV absorbed, so greedy tokens and logprobs agreeing checks the absorption as well as the cache. Both
configs turn YaRN on (the softmax scale changes with mscale_all_dim); V2 routes group-limited with a
dense first layer, V3 uses q_lora, grouped sigmoid routing with a non-zero correction bias and
routed_scaling_factor, and has an MTP layer's weights in its checkpoint that the loader must skip; it also
runs with tensor and expert parallelism (2 CPU ranks).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import STORIES, assert_matches_hf, hf_step_logprobs
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

from mini_infer import LLM, SamplingParams
from mini_infer.kernels.mla_decode import (
    mla_attention_ref,
    mla_attention_triton,
    mla_store_latent_ref,
    mla_store_latent_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: the interpreter on CPU
STEPS = 6
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rope_parameters=YARN,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "deepseek-v2": lambda: DeepseekV2Config(
        **COMMON,
        q_lora_rank=None,
        n_shared_experts=2,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    ),
    "deepseek-v3": lambda: DeepseekV3Config(
        **COMMON,
        q_lora_rank=24,
        n_shared_experts=1,
        first_k_dense_replace=0,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_interleave=True,
    ),
}
_gen = torch.Generator().manual_seed(1)
_shared = torch.randint(3, 512, (20,), generator=_gen).tolist()
PROMPTS = [torch.randint(3, 512, (n,), generator=_gen).tolist() for n in (7, 19, 1, 13, 12)] + [
    _shared + [5, 6, 7],
    _shared + [9],
]
PARAMS = SamplingParams(temperature=0, max_tokens=STEPS, logprobs=3, ignore_eos=True)


def _save_random(path: Path, config) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init: logits far from uniform, routing far from ties
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / f, path / f)
    if config.model_type == "deepseek_v3":  # an MTP layer after the last decoder layer, as on the Hub
        tensors = load_file(path / "model.safetensors")
        tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
        tensors["model.layers.2.self_attn.kv_b_proj.weight"] = torch.zeros(4, 4)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ds_model(request, tmp_path_factory) -> str:
    return _save_random(tmp_path_factory.mktemp(request.param), CONFIGS[request.param]())


@pytest.fixture(scope="module")
def expected(ds_model) -> list[tuple[list[int], torch.Tensor]]:
    return [hf_step_logprobs(ds_model, p, STEPS) for p in PROMPTS]


def _generate(llm: LLM, prompts=PROMPTS):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)


def test_one_by_one(ds_model, expected):
    llm = LLM(ds_model, dtype="float32")
    for prompt, exp in zip(PROMPTS, expected):
        assert_matches_hf(_generate(llm, [prompt]), [exp])


def test_batched_prefix_cached(ds_model, expected):
    llm = LLM(ds_model, dtype="float32", enable_prefix_caching=True)
    assert_matches_hf(_generate(llm), expected)
    assert_matches_hf(_generate(llm), expected)  # the shared 16-token block now comes from the cache
    assert llm.llm_engine.stats.prefix_cache_hits > 0
    assert llm.llm_engine.stats.num_kv_blocks_used == 0


def test_chunked_prefill(ds_model, expected):
    llm = LLM(ds_model, dtype="float32", max_num_batched_tokens=8, block_size=16)
    assert_matches_hf(_generate(llm), expected)


def test_preemption(ds_model, expected):
    # 3 blocks of 16 tokens: the sequences that grow past 16 tokens while others run must preempt
    llm = LLM(ds_model, dtype="float32", num_gpu_blocks_override=3, max_model_len=48)
    assert_matches_hf(_generate(llm), expected)
    assert llm.llm_engine.stats.num_preemptions > 0
    assert llm.llm_engine.stats.num_kv_blocks_used == 0


def test_speculative_verify_rows(ds_model, expected):
    """The model as its own draft: every verify run (1 + k decode rows over the latent cache) is accepted
    and the tokens and logprobs stay transformers'."""
    spec = {"method": "draft_model", "model": ds_model, "num_speculative_tokens": 3}
    llm = LLM(ds_model, dtype="float32", speculative_config=spec)
    assert_matches_hf(_generate(llm), expected)
    stats = llm.llm_engine.stats
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens


def test_triton_kernels_in_the_engine(ds_model, expected):
    """The Triton MLA kernels (interpreter) in a batched, chunked run through the CUDA-graph input path
    (padded rows): a 7-token prompt prefilled in two chunks beside a 1-token one, then both decode. One
    config: the interpreter is slow."""
    if "v3" not in ds_model:
        pytest.skip("the V3 config covers the kernels")
    llm = LLM(ds_model, dtype="float32", kernel_backend="triton", max_num_batched_tokens=4, max_num_seqs=2)
    llm.llm_engine.model_runner.capture_cuda_graphs()  # off CUDA: the graphs' static, padded inputs, run eagerly
    graphs = llm.llm_engine.model_runner.graphs
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": PROMPTS[i]} for i in (0, 2)], params, use_tqdm=False)
    for out, i in zip(outs, (0, 2)):
        tokens, logprobs = expected[i]
        assert out.outputs[0].token_ids == tokens[:3]
        for step, entry in enumerate(out.outputs[0].logprobs):
            for token, lp in entry.items():
                assert abs(lp.logprob - logprobs[step, token].item()) < 1e-4
    assert graphs.prefill.num_replays > 0 and graphs.decode.num_replays > 0


def test_latent_cache_is_one_entry_per_token(ds_model):
    llm = LLM(ds_model, dtype="float32")
    layers = llm.llm_engine.model_runner.model.attention_layers()
    assert layers[0].kv_cache_shape(10, 16) == (10, 16, 32 + 8)


@pytest.mark.parametrize("splits,dtype", [(1, torch.float32), (3, torch.float32), (2, torch.bfloat16)])
def test_mla_kernel_matches_reference(splits, dtype):
    torch.manual_seed(0)
    H, R, P, bs, nb = 5, 32, 16, 4, 12
    cache = torch.randn(nb, bs, R + P).to(DEVICE, dtype)
    tables = torch.randperm(nb)[:8].view(2, 4).int().to(DEVICE)
    # rows: a decode row of sequence 0 (11 keys), a 3-token prefill chunk of sequence 1 at 5..7, a padding row
    lens = torch.tensor([11, 6, 7, 8, 0], dtype=torch.int32, device=DEVICE)
    rows = tables[[0, 1, 1, 1, 1]]
    q = torch.randn(5, H, R + P).to(DEVICE, dtype)
    ref = mla_attention_ref(q, cache, lens, rows, R, 0.3)
    out = mla_attention_triton(q, cache, lens, rows, R, 0.3, num_splits=splits, block_n=16)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[:4].float(), ref[:4].float(), atol=tol, rtol=tol)
    assert torch.equal(out[4], torch.zeros_like(out[4]))  # a padding row (no keys) gives zeros


def test_store_kernel_matches_reference():
    latent = torch.randn(4, 24, device=DEVICE)
    slots = torch.tensor([3, -1, 0, 9], device=DEVICE)
    a, b = torch.zeros(3, 4, 24, device=DEVICE), torch.zeros(3, 4, 24, device=DEVICE)
    mla_store_latent_ref(latent, a, slots)
    mla_store_latent_triton(latent, b, slots)
    assert torch.equal(a, b) and torch.equal(a.view(-1, 24)[9], latent[3])


def test_presets_build():
    from mini_infer.kernels import TORCH_OPS
    from mini_infer.model_loader import load_hf_config, preset_path
    from mini_infer.models import get_model_class

    for name in ("deepseek-v2-lite", "deepseek-v3"):
        config = load_hf_config(preset_path(name))
        assert get_model_class(config).__name__.startswith("Deepseek")
    config = load_hf_config(preset_path("deepseek-v2-lite"))
    config.num_hidden_layers, config.vocab_size, config.max_position_embeddings = 1, 64, 64  # the dense layer
    model = get_model_class(config)(config, TORCH_OPS)
    assert model.attention_layers()[0].kv_cache_shape(1, 16) == (1, 16, 512 + 64)
    assert model.model.layers[0].self_attn.attn.scale == pytest.approx(192**-0.5 * (0.0707 * math.log(40) + 1) ** 2)


def test_bad_routing_config_is_a_value_error():
    from mini_infer.models.deepseek_v2 import DeepseekRouter

    config = CONFIGS["deepseek-v2"]()
    config.topk_group = 5  # more groups kept than there are
    with pytest.raises(ValueError, match="topk_group"):
        DeepseekRouter(config, v3=False)
    config.topk_method = "noaux"
    with pytest.raises(ValueError, match="topk_method"):
        DeepseekRouter(config, v3=False)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_tensor_parallel(ds_model, expected, expert_parallel):
    """2 ranks (gloo, CPU): heads of q/kv_b/o split, the latent replicated; experts split by their
    intermediate size, or whole experts per rank. One config: the V3 one covers q_lora and its router."""
    if "v3" not in ds_model:
        pytest.skip("the V3 config covers tensor parallelism")
    llm = LLM(ds_model, dtype="float32", device="cpu", tensor_parallel_size=2, enable_expert_parallel=expert_parallel)
    try:
        assert_matches_hf(_generate(llm, PROMPTS[:2]), expected[:2])
    finally:
        llm.llm_engine.shutdown()


def test_online_fp8_leaves_the_absorbed_weights_alone(ds_model):
    """quantization="fp8" quantizes the projections; kv_b_proj's halves, absorbed around attention, stay."""
    llm = LLM(ds_model, dtype="float32", quantization="fp8")
    attn = llm.llm_engine.model_runner.model.model.layers[0].self_attn
    assert attn.kv_b_proj.weight.dtype == torch.float32
    out = _generate(llm, PROMPTS[:1])
    assert len(out[0].outputs[0].token_ids) == STEPS
