"""Tensor and expert parallelism on CPU (gloo, 2 ranks, the mp executor) against transformers: greedy
tokens identical and logprobs within 1e-4 with prefix caching, chunked prefill and preemption on (the
all-reduce sums in another order than one process does, so logits differ in the last bits only); bad
sizes are ValueErrors before anything starts; a dead worker is a clear error, never a hang, and no
worker outlives its engine."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from conftest import QWEN3, STORIES, hf_step_logprobs
from test_moe_models import CONFIGS, _save_random
from transformers import Qwen3Config

from mini_infer import LLM, SamplingParams
from mini_infer.distributed import check_parallel_sizes
from mini_infer.distributed.executor import ExecutorError

STEPS = 12
_gen = torch.Generator().manual_seed(3)
_shared = torch.randint(3, 512, (20,), generator=_gen).tolist()
PROMPTS = [torch.randint(3, 512, (n,), generator=_gen).tolist() for n in (5, 37)] + [_shared + [5], _shared + [9, 8]]
GREEDY = SamplingParams(temperature=0, max_tokens=STEPS, logprobs=2, ignore_eos=True)
# chunked prefill (16-token chunks), prefix caching, and a pool small enough to preempt
ENGINE = dict(
    dtype="float32",
    max_model_len=64,
    max_num_batched_tokens=16,
    num_gpu_blocks_override=5,
    enable_prefix_caching=True,
    tensor_parallel_size=2,
)


def _check(llm: LLM, path: str) -> None:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        tokens, logprobs = hf_step_logprobs(path, prompt, STEPS)
        completion = out.outputs[0]
        assert completion.token_ids == tokens
        for step, entry in enumerate(completion.logprobs):
            for token, lp in entry.items():
                assert abs(lp.logprob - logprobs[step, token].item()) < 1e-4, (step, token)


def _hf_prompt_logprobs(path: str, prompt: list[int]) -> torch.Tensor:
    from conftest import _hf_model

    with torch.no_grad():
        logits = _hf_model(path)(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    return logits[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)


def _workers(llm: LLM) -> list:
    return llm.llm_engine.executor.procs


def test_stories_tp2():
    """stories260K: 8 heads, 4 KV heads, tied embeddings (the vocab-parallel LM head is the embedding)."""
    llm = LLM(str(STORIES), **ENGINE)
    try:
        _check(llm, str(STORIES))
        assert llm.llm_engine.stats.num_preemptions > 0 and llm.llm_engine.stats.prefix_cache_hits > 0
        seeded = SamplingParams(temperature=0.9, seed=7, max_tokens=8)
        a, b = (llm.generate([{"prompt_token_ids": PROMPTS[1]}], seeded, use_tqdm=False) for _ in range(2))
        assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
        # prompt logprobs: every rank makes the LM head's chunks (its all-gathers) over the whole prompt
        prompt = PROMPTS[1]
        out = llm.generate(
            [{"prompt_token_ids": prompt}], SamplingParams(max_tokens=2, prompt_logprobs=0), use_tqdm=False
        )
        ref = _hf_prompt_logprobs(str(STORIES), prompt)
        got = [next(iter(e.values())).logprob for e in out[0].prompt_logprobs[1:]]
        assert torch.allclose(torch.tensor(got), ref, atol=1e-4)
        # another engine while this one holds the group: refused at once (it used to wait 300 s on a collective)
        with pytest.raises(ValueError, match="shut the other engine down"):
            LLM(str(STORIES), dtype="float32")
        # an exception in a worker (here: a step it cannot unpickle) surfaces on rank 0 with its reason
        executor = llm.llm_engine.executor
        send = executor.send_step
        executor.send_step = lambda data: send(b"not a pickle")
        with pytest.raises(ExecutorError, match="worker 1 raised UnpicklingError"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
    finally:
        procs = _workers(llm)
        llm.llm_engine.shutdown()
    assert not any(p.is_alive() for p in procs)


def test_qwen3_tp2_then_a_worker_dies():
    """tiny-random-qwen3 (q/k norm, untied LM head); then its worker is killed: the next step raises a
    clear ExecutorError (not a hang) and the engine's workers are gone."""
    llm = LLM(str(QWEN3), **ENGINE)
    procs = _workers(llm)
    try:
        _check(llm, str(QWEN3))
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].join(10)
        start = time.monotonic()
        with pytest.raises(ExecutorError, match="worker 1 died"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 30
        with pytest.raises(ExecutorError):  # and stays failed
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert not any(p.is_alive() for p in procs)


def test_moe_expert_parallel(tmp_path):
    """Qwen3-MoE (8 experts, top-2, a dense layer) with each rank holding 4 whole experts."""
    path = _save_random(tmp_path, CONFIGS["qwen3-moe"]())
    llm = LLM(path, enable_expert_parallel=True, **ENGINE)
    try:
        _check(llm, path)
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(tensor_parallel_size=3), "does not divide the model's 8 attention heads"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer"),
        (dict(tensor_parallel_size=2, distributed_executor_backend="slurm"), "distributed_executor_backend"),
        (dict(enable_expert_parallel=True), "needs tensor_parallel_size > 1"),
        (dict(tensor_parallel_size=2, enable_expert_parallel=True), "needs a mixture-of-experts model"),
        (dict(tensor_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 2}), "not"),
    ],
)
def test_bad_sizes_are_value_errors(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        LLM(str(STORIES), **kwargs)


def test_unsplittable_models():
    base = dict(vocab_size=512, hidden_size=64, head_dim=16, num_hidden_layers=1, intermediate_size=128)
    with pytest.raises(ValueError, match="6 KV heads"):
        check_parallel_sizes(Qwen3Config(**base, num_attention_heads=12, num_key_value_heads=6), 4, False)
    check_parallel_sizes(Qwen3Config(**base, num_attention_heads=8, num_key_value_heads=2), 4, False)  # replicated
    with pytest.raises(ValueError, match="intermediate_size=102"):
        config = Qwen3Config(**{**base, "intermediate_size": 102}, num_attention_heads=4, num_key_value_heads=4)
        check_parallel_sizes(config, 4, False)
    moe = CONFIGS["qwen3-moe"]()
    moe.num_experts = 6
    with pytest.raises(ValueError, match="6 experts"):
        check_parallel_sizes(moe, 4, True)


def test_ray_executor():
    """Two ranks: rank 0 here, rank 1 a Ray actor in a placement group on a local Ray instance."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    try:
        llm = LLM(str(QWEN3), distributed_executor_backend="ray", **ENGINE)
        try:
            _check(llm, str(QWEN3))
        finally:
            llm.llm_engine.shutdown()
    finally:
        ray.shutdown()


def test_qwen3_tp4_replicates_kv_heads():
    """4 ranks, 4 heads, 2 KV heads: each KV head lives on two ranks."""
    llm = LLM(str(QWEN3), **{**ENGINE, "tensor_parallel_size": 4})
    try:
        attn = llm.llm_engine.model_runner.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads, attn.qkv_proj.kv_replicas) == (1, 1, 2)
        _check(llm, str(QWEN3))
    finally:
        llm.llm_engine.shutdown()


def test_moe_tensor_parallel(tmp_path):
    """Qwen2-MoE without expert parallelism: every rank holds half of each expert (and of the shared one)."""
    path = _save_random(tmp_path, CONFIGS["qwen2-moe"]())
    llm = LLM(path, **ENGINE)
    try:
        _check(llm, path)
    finally:
        llm.llm_engine.shutdown()


_CHILD = """
import os, signal, sys
from mini_infer import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, max_model_len=64)
print(" ".join(str(p.pid) for p in llm.llm_engine.executor.procs), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_no_worker_outlives_its_process(end):
    """A script that ends without shutdown(), or is killed outright: its workers go with it."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(STORIES), end], capture_output=True, text=True, timeout=120
    )
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 1, result.stderr[-2000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pids[0]}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pids[0]}")


def test_every_rank_quantizes():
    """quantization="int8" on two ranks: both shards are 8-bit, so the prompt log-likelihoods move away from
    float32 as far as one int8 rank's do (per-shard activation scales move them a little; the rank-0-only
    quantization this guards against moved them half as far: 0.039 against 0.087 nats)."""
    prompt = {"prompt_token_ids": [(7 * j) % 500 + 3 for j in range(48)]}
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def prompt_logprobs(**kwargs) -> torch.Tensor:
        llm = LLM(str(STORIES), dtype="float32", **kwargs)
        try:
            out = llm.generate([prompt], params, use_tqdm=False)[0]
        finally:
            llm.llm_engine.shutdown()
        return torch.tensor([next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]])

    fp32 = prompt_logprobs()
    one = (prompt_logprobs(quantization="int8") - fp32).abs().mean()
    two = (prompt_logprobs(quantization="int8", tensor_parallel_size=2) - fp32).abs().mean()
    assert 0.8 < two / one < 1.25, (two, one)
