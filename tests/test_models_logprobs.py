"""Every supported architecture: greedy tokens identical to transformers and per-step logprobs
within 1e-4, on the Qwen3 fixture and on random-weight models built here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import STORIES, hf_step_logprobs
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from mini_infer import LLM, SamplingParams

STEPS = 24
PROMPT_IDS = [1, 400, 301, 260, 290, 334, 267, 41, 73, 300, 285, 389, 290, 411, 266, 280, 322, 348, 290]
SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _save_random(tmp: Path, config) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so that logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / f, tmp / f)
    return str(tmp)


def _llama3_scaled():
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return LlamaConfig(**SMALL, rope_parameters=rope, tie_word_embeddings=False)


CONFIGS = {
    "llama-gqa-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama3-rope-scaling-untied": _llama3_scaled,
    "mistral": lambda: MistralConfig(**SMALL, sliding_window=None, head_dim=8),
    "qwen2-qkv-bias": lambda: Qwen2Config(**SMALL, tie_word_embeddings=True),
    "qwen2-mha-untied": lambda: Qwen2Config(**{**SMALL, "num_key_value_heads": 8}, tie_word_embeddings=False),
}


def _compare(path: str, llm: LLM) -> None:
    hf_tokens, hf_logprobs = hf_step_logprobs(path, PROMPT_IDS, STEPS)
    params = SamplingParams(temperature=0, max_tokens=STEPS, logprobs=5, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT_IDS}, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_tokens
    for step, entry in enumerate(out.logprobs):
        assert len(entry) >= 5
        for token, lp in entry.items():
            assert abs(lp.logprob - hf_logprobs[step, token].item()) < 1e-4, (step, token)
        top = hf_logprobs[step].topk(5).indices.tolist()
        assert set(top) <= set(entry)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_model_matches_transformers(tmp_path, name):
    path = _save_random(tmp_path, CONFIGS[name]())
    _compare(path, LLM(path, dtype="float32", block_size=16))


def test_qwen3_fixture_matches_transformers(qwen3_path):
    _compare(qwen3_path, LLM(qwen3_path, dtype="float32"))


def test_qwen3_fixture_chunked_and_cached(qwen3_path):
    llm = LLM(qwen3_path, dtype="float32", max_num_batched_tokens=16)
    _compare(qwen3_path, llm)
    _compare(qwen3_path, llm)  # second time through the prefix cache
    assert llm.llm_engine.stats.prefix_cache_hits >= 16
