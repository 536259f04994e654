"""stories260K greedy output equals transformers' token for token and text for text, however the
engine batches, chunks, caches or preempts."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, hf_greedy
from transformers import AutoTokenizer

from mini_infer import LLM, SamplingParams

MAX_TOKENS = 48
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def expected(stories_path: str) -> list[tuple[list[int], str]]:
    tok = AutoTokenizer.from_pretrained(stories_path)
    out = []
    for prompt in PROMPTS:
        ids = hf_greedy(stories_path, tok.encode(prompt), MAX_TOKENS)
        if 1 in ids or 2 in ids:  # HF stops at either EOS id of the generation config
            ids = ids[: min(i for i, t in enumerate(ids) if t in (1, 2)) + 1]
        out.append((ids, tok.decode(ids, skip_special_tokens=True)))
    return out


def check(outputs, expected) -> None:
    for out, (ids, text) in zip(outputs, expected, strict=True):
        assert out.outputs[0].token_ids == ids
        assert out.outputs[0].text == text


def test_one_by_one(stories_path, expected):
    llm = LLM(stories_path, dtype="float32")
    check([llm.generate(p, GREEDY, use_tqdm=False)[0] for p in PROMPTS], expected)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched(stories_path, expected, prefix_caching):
    llm = LLM(stories_path, dtype="float32", enable_prefix_caching=prefix_caching)
    check(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected)
    # the same prompts again: with caching on, every full prompt block comes from the cache
    again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    check(again, expected)
    stats = llm.llm_engine.stats
    if prefix_caching:
        assert stats.prefix_cache_hits > 0
        assert again[2].num_cached_tokens == 16
    else:
        assert stats.prefix_cache_hits == 0
    assert stats.num_kv_blocks_used == 0  # nothing leaked


def test_chunked_prefill_tiny_budget(stories_path, expected):
    llm = LLM(stories_path, dtype="float32", max_num_batched_tokens=16, block_size=16)
    check(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected)


def test_preemption(stories_path, expected):
    # 8 blocks of 16 tokens cannot hold 8 sequences of up to ~70 tokens: preemption must happen
    llm = LLM(stories_path, dtype="float32", num_gpu_blocks_override=8, max_model_len=128)
    check(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected)
    stats = llm.llm_engine.stats
    assert stats.num_preemptions > 0
    assert stats.num_kv_blocks_used == 0


def test_preemption_without_prefix_cache_and_chunking(stories_path, expected):
    llm = LLM(
        stories_path,
        dtype="float32",
        num_gpu_blocks_override=8,
        max_model_len=128,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
    )
    check(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected)
    assert llm.llm_engine.stats.num_preemptions > 0


def test_eos_from_generation_config(stories_path):
    llm = LLM(stories_path)
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=400), use_tqdm=False)[0]
    # the story ends with <s> (id 1), listed only in generation_config.json
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] == 1


def test_triton_kernels_end_to_end(stories_path, expected):
    """The whole engine on the Triton kernels (run by Triton's interpreter on CPU), chunked and
    batched so that decode, prefill-over-cached-prefix and mixed steps all occur."""
    llm = LLM(stories_path, dtype="float32", kernel_backend="triton", max_num_batched_tokens=32)
    short = SamplingParams(temperature=0.0, max_tokens=12)
    outs = llm.generate(PROMPTS[:4], short, use_tqdm=False)
    for out, (ids, _) in zip(outs, expected[:4]):
        assert out.outputs[0].token_ids == ids[:12]


def _with_static_inputs(llm: LLM) -> None:
    """Switches the engine to the CUDA-graph input path (static buffers, padded batches, tile lists);
    off CUDA each "graph" runs the same forward eagerly, so only the recording differs from a GPU."""
    llm.llm_engine.model_runner.capture_cuda_graphs()


def test_static_graph_inputs_on_triton_kernels(stories_path, expected):
    """Decode, prefill and mixed steps through the padded graph buffers and the prefill tile list."""
    llm = LLM(stories_path, dtype="float32", kernel_backend="triton", max_num_batched_tokens=32, max_num_seqs=4)
    _with_static_inputs(llm)
    runner = llm.llm_engine.model_runner
    assert runner.graphs.prefill.sizes == [16, 32] and runner.graphs.decode.sizes == [1, 2, 4]
    outs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    for out, (ids, _) in zip(outs, expected[:4]):
        assert out.outputs[0].token_ids == ids[:12]
    assert runner.graphs.prefill.num_replays > 0 and runner.graphs.decode.num_replays > 0


def test_static_graph_inputs_with_preemption(stories_path, expected):
    llm = LLM(stories_path, dtype="float32", num_gpu_blocks_override=8, max_model_len=128, max_num_batched_tokens=48)
    _with_static_inputs(llm)
    check(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected)
    assert llm.llm_engine.stats.num_preemptions > 0
    assert llm.llm_engine.model_runner.graphs.prefill.num_replays > 0


def test_sync_scheduling_matches(stories_path, expected):
    # async_scheduling=False reads every step back before scheduling the next: the same tokens
    llm = LLM(stories_path, dtype="float32", async_scheduling=False, num_gpu_blocks_override=8, max_model_len=128)
    check(llm.generate(PROMPTS, GREEDY, use_tqdm=False), expected)
    assert llm.llm_engine.stats.num_preemptions > 0


def test_async_and_sync_agree_on_sampling_stops_and_penalties(stories_path):
    # Seeded sampling, stop strings, min_tokens, n > 1, logprobs and penalties: the one-step lag of async
    # scheduling must change nothing a user sees (penalties switch the engine to synchronous steps).
    params = [
        SamplingParams(temperature=0.8, seed=7, max_tokens=40, n=2, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=40, stop=[" the"], min_tokens=3),
        SamplingParams(
            temperature=1.0, seed=3, top_p=0.9, max_tokens=30, repetition_penalty=1.3, frequency_penalty=0.2
        ),
        SamplingParams(temperature=0.0, max_tokens=60),
    ]
    prompts = PROMPTS[: len(params)]
    results = []
    for async_scheduling in (True, False):
        llm = LLM(stories_path, dtype="float32", async_scheduling=async_scheduling, max_num_batched_tokens=16)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append(
            [
                [
                    (
                        c.token_ids,
                        c.text,
                        c.finish_reason,
                        c.stop_reason,
                        [{t: round(lp.logprob, 5) for t, lp in e.items()} for e in c.logprobs or []],
                    )
                    for c in o.outputs
                ]
                for o in outs
            ]
        )
        assert llm.llm_engine.stats.num_kv_blocks_used == 0
        assert llm.llm_engine.output_processor.num_penalty_requests == 0
    assert results[0] == results[1]
