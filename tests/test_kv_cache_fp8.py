"""FP8 KV cache (kv_cache_dtype="fp8") in the engine.

Exactness: an fp8 engine against a reference engine whose pool stays float32 but whose K/V are rounded
through e4m3 right after each store, written out here ((x / scale) saturated to ±448, cast, times scale):
the same arithmetic, so greedy tokens and logprobs must be identical.

Closeness to the unquantized model, and the bound: e4m3 keeps 3 mantissa bits, bfloat16 7, so a K/V value
rounded to e4m3 moves 2^(7-3) = 16 times as far (relative, within its binade) as one rounded to bfloat16.
To first order every log-likelihood moves linearly with the K/V perturbation, so the mean |change| of the
log-likelihood of fp32's own greedy tokens under an e4m3 cache should be ~16x that under a bfloat16-rounded
cache on the same tokens, which measures the model's own sensitivity. The test allows twice that linear
prediction (32x). Measured (8 prompts x 40 tokens, teacher-forced): stories260K 0.0650 against 0.00384
(16.9x), tiny-random-qwen3 0.0222 against 0.00156 (14.2x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from conftest import PROMPTS, STORIES
from safetensors.torch import load_file, save_file
from test_quantization import write_compressed_tensors

from mini_infer import LLM, SamplingParams
from mini_infer.attention.mla import MLAAttention
from mini_infer.config import EngineConfig, add_engine_args
from mini_infer.kernels import get_ops
from mini_infer.worker.kv_cache import KVCache

FP8 = torch.float8_e4m3fn
ENGINE = dict(enforce_eager=True, dtype="float32")  # float32 on a GPU too, where "auto" is bfloat16
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, logprobs=2)


def fake_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded through the pool: e4m3 of x / scale (saturated to ±448), times scale, in float32."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(FP8).float() * scale


def round_kv_after_store(llm: LLM, rounding=fake_e4m3) -> None:
    """Makes a model-dtype engine the reference: each layer stores K/V as before, then the stored slots
    are replaced by their rounding (with the scales the layer passes)."""
    for layer in llm.llm_engine.model_runner.model.attention_layers():
        store = layer.ops.rotary_store_kv

        def rounded_store(positions, q, k, v, cos_sin, k_cache, v_cache, slots, *args, k_scale, v_scale, store=store):
            store(positions, q, k, v, cos_sin, k_cache, v_cache, slots, *args)
            written = slots[slots >= 0]
            for cache, scale in ((k_cache, k_scale), (v_cache, v_scale)):
                flat = cache.view(-1, *cache.shape[2:])
                flat[written] = rounding(flat[written], scale).to(flat.dtype)

        layer.ops = dataclasses.replace(layer.ops, rotary_store_kv=rounded_store)


def set_scales(llm: LLM, k_scale: float, v_scale: float) -> None:
    for layer in llm.llm_engine.model_runner.model.attention_layers():
        layer.k_scale.fill_(k_scale)
        layer.v_scale.fill_(v_scale)


def _tokens_and_logprobs(outs) -> tuple[list, list]:
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[sorted((t, lp.logprob) for t, lp in step.items()) for step in o.outputs[0].logprobs] for o in outs]
    return tokens, logprobs


@pytest.mark.parametrize("fixture", ["stories_path", "qwen3_path"])
def test_fp8_engine_equals_e4m3_rounded_reference(fixture, request):
    """Prefix caching, chunked prefill at a 16-token budget (prefill over a cached fp8 prefix), batched
    decode; scales that are not powers of two, so a missing or inverted scale shows."""
    path = request.getfixturevalue(fixture)
    kwargs = dict(max_num_batched_tokens=16, **ENGINE)
    fp8 = LLM(path, kv_cache_dtype="fp8", **kwargs)
    ref = LLM(path, **kwargs)
    round_kv_after_store(ref)
    for llm in (fp8, ref):
        set_scales(llm, 0.3, 0.7)
    assert fp8.llm_engine.model_runner.kv_cache.dtype == FP8
    assert ref.llm_engine.model_runner.kv_cache.dtype == torch.float32
    got = _tokens_and_logprobs(fp8.generate(PROMPTS, GREEDY, use_tqdm=False))
    want = _tokens_and_logprobs(ref.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert got == want
    assert fp8.llm_engine.stats.prefix_cache_hits > 0  # the two prompts sharing a prefix read cached fp8 blocks


def _score(llm: LLM, seqs: list[list[int]], starts: list[int]) -> torch.Tensor:
    """Log-likelihood of each generated token of seqs (teacher-forced through prompt_logprobs)."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
    lls = [o.prompt_logprobs[p][s[p]].logprob for o, s, st in zip(outs, seqs, starts) for p in range(st, len(s))]
    return torch.tensor(lls, dtype=torch.float64)


@pytest.mark.parametrize("fixture", ["stories_path", "qwen3_path"])
def test_fp8_log_likelihood_within_the_derived_bound(fixture, request):
    path = request.getfixturevalue(fixture)
    base = LLM(path, **ENGINE)
    outs = base.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0), use_tqdm=False)
    seqs = [[*o.prompt_token_ids, *o.outputs[0].token_ids] for o in outs]
    starts = [len(o.prompt_token_ids) for o in outs]
    ll_fp32 = _score(base, seqs, starts)
    bf16 = LLM(path, **ENGINE)
    round_kv_after_store(bf16, lambda x, scale: x.to(torch.bfloat16).float())
    bf16_change = (_score(bf16, seqs, starts) - ll_fp32).abs().mean().item()
    fp8_change = (_score(LLM(path, kv_cache_dtype="fp8", **ENGINE), seqs, starts) - ll_fp32).abs().mean().item()
    assert 0 < bf16_change and 0 < fp8_change <= 2 * 2 ** (7 - 3) * bf16_change, (fp8_change, bf16_change)


def test_pool_holds_float8_and_twice_the_blocks():
    """Same memory budget: a bfloat16 pool and an fp8 one; fp8 has half the bytes per block, twice the blocks,
    and its tensors really are float8."""
    budget = dict(enforce_eager=True, dtype="bfloat16", device="cpu", cpu_kv_cache_gib=2**-10)  # a host pool's budget
    fp8_llm = LLM(str(STORIES), kv_cache_dtype="fp8_e4m3", **budget)
    auto, fp8 = LLM(str(STORIES), **budget).llm_engine, fp8_llm.llm_engine
    pools = auto.model_runner.kv_cache, fp8.model_runner.kv_cache
    assert [t.dtype for t in pools[0].tensors] == [torch.bfloat16] * 5
    assert [t.dtype for t in pools[1].tensors] == [FP8] * 5 and pools[1].tensors[0].element_size() == 1
    assert pools[0].block_bytes == 2 * pools[1].block_bytes
    nbytes = [sum(t.numel() * t.element_size() for t in p.tensors) for p in pools]
    assert nbytes[1] <= nbytes[0] <= 2**20 and nbytes[1] > nbytes[0] - pools[0].block_bytes
    blocks = auto.stats.num_kv_blocks_total, fp8.stats.num_kv_blocks_total
    assert blocks[1] == 2 * blocks[0] and blocks[0] == 2**20 // pools[0].block_bytes
    outs = fp8_llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]  # bf16 activations over an fp8 pool


def test_triton_kernels_in_the_engine(stories_path):
    """kernel_backend="triton" (the interpreter on CPU) with an fp8 pool: the torch backend's tokens."""
    kwargs = dict(kv_cache_dtype="fp8", max_num_batched_tokens=32, **ENGINE)
    short = SamplingParams(temperature=0.0, max_tokens=12)
    torch_outs = LLM(stories_path, **kwargs).generate(PROMPTS[:4], short, use_tqdm=False)
    triton_outs = LLM(stories_path, kernel_backend="triton", **kwargs).generate(PROMPTS[:4], short, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in triton_outs] == [o.outputs[0].token_ids for o in torch_outs]


def test_swap_preemption_moves_fp8_blocks(stories_path):
    """A pool too small for the batch: fp8 blocks are swapped to the host pool and back, bytes intact."""
    params = SamplingParams(temperature=0.0, max_tokens=48)
    big = LLM(stories_path, kv_cache_dtype="fp8", **ENGINE)
    want = [o.outputs[0].token_ids for o in big.generate(PROMPTS, params, use_tqdm=False)]
    tiny = dict(num_gpu_blocks_override=8, max_model_len=128, preemption_mode="swap", swap_space=0.01)
    llm = LLM(stories_path, kv_cache_dtype="fp8", **tiny, **ENGINE)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)] == want
    stats = llm.llm_engine.stats
    assert stats.num_swap_outs > 0 and stats.num_swap_ins == stats.num_swap_outs


def test_tensor_parallel_and_speculative_decoding_over_fp8(stories_path):
    """Two ranks (each its KV heads, the same per-tensor scales) and speculative decoding (n-gram; a draft
    model whose layers share the fp8 pool): one rank's plain greedy tokens over the same fp8 pool."""
    prompts, params = PROMPTS[:4], SamplingParams(temperature=0.0, max_tokens=16)
    base = LLM(stories_path, kv_cache_dtype="fp8", device="cpu", **ENGINE)  # the ranks are gloo processes
    want = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    for extra in (
        dict(tensor_parallel_size=2),
        dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3}),
        dict(speculative_config={"method": "draft_model", "model": stories_path, "num_speculative_tokens": 2}),
    ):
        llm = LLM(stories_path, kv_cache_dtype="fp8", device="cpu", **extra, **ENGINE)
        try:
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want, extra
        finally:  # a live tensor-parallel group would make the next engine's collectives wait for rank 1
            llm.llm_engine.shutdown()


def test_mla_refuses_an_fp8_pool():
    layer = MLAAttention(num_heads=4, kv_lora_rank=16, rope_dim=8, scale=0.1, ops=get_ops("torch"))
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not supported by MLAAttention"):
        KVCache([layer], 16, FP8, torch.device("cpu"))
    KVCache([layer], 16, torch.float32, torch.device("cpu"))  # the model dtype is fine


def test_config_validation_and_flag():
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \['auto', 'fp8', 'fp8_e4m3'\], got 'int8'"):
        EngineConfig(model=str(STORIES), kv_cache_dtype="int8")
    args = add_engine_args(argparse.ArgumentParser()).parse_args(["--kv-cache-dtype", "fp8"])
    config = EngineConfig.from_cli_args(argparse.Namespace(model=str(STORIES), **vars(args)))
    assert config.kv_cache_dtype == "fp8" and config.resolve_kv_cache_dtype(torch.bfloat16) == FP8
    assert EngineConfig(model=str(STORIES)).resolve_kv_cache_dtype(torch.bfloat16) == torch.bfloat16


# -- checkpoint scales (compressed-tensors kv_cache_scheme) ---------------------------------------------
KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _fp8_kv_checkpoint(path, scales: dict[str, torch.Tensor], scheme: dict = KV_SCHEME) -> str:
    """stories260K as compressed-tensors FP8 W8A8, plus a kv_cache_scheme and its per-layer scales."""
    write_compressed_tensors(STORIES, path, "float-quantized")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = scheme
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(path / "model.safetensors"))
    save_file({**tensors, **scales}, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def test_checkpoint_kv_scales_load_and_are_used(tmp_path):
    scales = {}
    for i in range(5):  # both names vLLM reads: self_attn.k_scale and the older k_proj.output_scale
        scales[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.05 * (i + 1))
        v_name = f"model.layers.{i}.self_attn.v_scale" if i % 2 else f"model.layers.{i}.self_attn.v_proj.output_scale"
        scales[v_name] = torch.tensor([0.02 * (i + 2)])
    scales["model.layers.0.self_attn.q_scale"] = torch.tensor(1.0)  # FP8 attention's: skipped
    path = _fp8_kv_checkpoint(tmp_path / "ckpt", scales)
    fp8 = LLM(path, kv_cache_dtype="fp8", **ENGINE)
    layers = fp8.llm_engine.model_runner.model.attention_layers()
    assert [round(layer.k_scale.item(), 6) for layer in layers] == [round(0.05 * (i + 1), 6) for i in range(5)]
    assert [round(layer.v_scale.item(), 6) for layer in layers] == [round(0.02 * (i + 2), 6) for i in range(5)]
    ref = LLM(path, **ENGINE)  # "auto": the scales load and the model-dtype pool ignores them
    assert ref.llm_engine.model_runner.kv_cache.dtype == torch.float32
    assert ref.llm_engine.model_runner.model.attention_layers()[3].k_scale.item() == pytest.approx(0.2)
    round_kv_after_store(ref)
    assert _tokens_and_logprobs(fp8.generate(PROMPTS[:3], GREEDY, use_tqdm=False)) == _tokens_and_logprobs(
        ref.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    )


@pytest.mark.parametrize(
    "scales,scheme,match",
    [
        ({}, {**KV_SCHEME, "strategy": "head"}, "kv_cache_scheme strategy='head'"),
        ({}, {**KV_SCHEME, "dynamic": True}, "kv_cache_scheme dynamic=True"),
        ({"model.layers.0.self_attn.k_scale": torch.ones(4)}, KV_SCHEME, "only per-tensor KV cache scales"),
        ({"model.layers.0.self_attn.v_scale": torch.tensor(0.0)}, KV_SCHEME, "positive and finite"),
    ],
)
def test_bad_checkpoint_kv_schemes_are_value_errors(tmp_path, scales, scheme, match):
    path = _fp8_kv_checkpoint(tmp_path / "ckpt", scales, scheme)
    with pytest.raises(ValueError, match=match):
        LLM(path, kv_cache_dtype="fp8", **ENGINE)
