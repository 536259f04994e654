"""Bad input gets a ValueError that says what and why, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import STORIES

from mini_infer import LLM, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def llm(stories_path: str) -> LLM:
    return LLM(stories_path, max_model_len=64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-5), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n must"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(min_tokens=10, max_tokens=5), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
    ],
)
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="float8"), "dtype"),
        (dict(device="tpu"), "device"),
        (dict(block_size=10), "block_size"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(load_format="pickle"), "load_format"),
    ],
)
def test_invalid_engine_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model=str(STORIES), **kwargs)


def test_bad_requests_then_engine_still_serves(llm):
    greedy = SamplingParams(temperature=0, max_tokens=10)
    before = llm.generate("Once upon a time", greedy, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("Once upon a time " * 40, greedy, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, greedy, use_tqdm=False)
    with pytest.raises(ValueError, match="cannot fit"):
        llm.generate("Once upon a time", SamplingParams(max_tokens=100), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [1, 99999]}, greedy, use_tqdm=False)
    # a batch with one bad prompt adds none of them
    with pytest.raises(ValueError):
        llm.generate(["The cat", "x " * 100], greedy, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    after = llm.generate("Once upon a time", greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert after == before
    assert llm.llm_engine.stats.num_kv_blocks_used == 0


def test_max_model_len_beyond_model(stories_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(stories_path, max_model_len=100000)


def _copy_model(tmp_path, with_weights=True):
    dst = tmp_path / "model"
    shutil.copytree(STORIES, dst)
    if not with_weights:
        (dst / "model.safetensors").unlink()
    return dst


def test_unknown_architecture_lists_supported(tmp_path):
    dst = _copy_model(tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(dst))


def test_missing_weights(tmp_path):
    with pytest.raises(ValueError, match="no .safetensors"):
        LLM(str(_copy_model(tmp_path, with_weights=False)))


def test_mismatched_weights(tmp_path):
    dst = _copy_model(tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["hidden_size"] = 128
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit"):
        LLM(str(dst))


def test_sharded_index_missing_file(tmp_path):
    dst = _copy_model(tmp_path)
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ValueError, match="missing"):
        LLM(str(dst))


def test_missing_model_path():
    with pytest.raises(ValueError, match="neither a local directory"):
        LLM("/nonexistent/model-dir")
