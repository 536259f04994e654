"""Scheduler policies: static batching forms a full batch even when prefill takes several steps."""

from __future__ import annotations

import pytest

from mini_infer import EngineConfig, LLMEngine, SamplingParams


def test_static_batch_fills_over_several_prefill_steps(stories_path):
    engine = LLMEngine(
        EngineConfig(
            model=stories_path,
            max_num_seqs=4,
            max_num_batched_tokens=16,
            static_batching=True,
            enable_prefix_caching=False,
        )
    )
    prompt = {"prompt_token_ids": list(range(10, 22))}  # 12 tokens: one prompt fills most of a step
    for i in range(6):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=10 + i))
    peak, running_history = 0, []
    while engine.has_unfinished_requests():
        engine.step()
        running_history.append(engine.stats.num_running)
        peak = max(peak, engine.stats.num_running)
    assert peak == 4  # the first batch grew to max_num_seqs although no step could prefill all four
    first_drop = next(i for i, (a, b) in enumerate(zip(running_history, running_history[1:])) if b < a)
    # once the batch started decoding nobody joined until it emptied
    after = running_history[first_drop:]
    assert all(b <= a or a == 0 for a, b in zip(after, after[1:]))


def test_priority_orders_admission(stories_path):
    engine = LLMEngine(EngineConfig(model=stories_path, max_num_seqs=1))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for rid, prio in (("low", 5), ("high", 0), ("mid", 2)):
        engine.add_request(rid, "Once upon a time", params, priority=prio)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["high", "mid", "low"]


def test_engine_freezes_its_startup_heap_and_is_still_freed_when_dropped(stories_path):
    """The startup objects are frozen out of full collections (they stalled decode steps), yet a dropped
    engine, its runner and its KV cache are still freed."""
    import gc
    import weakref

    engine = LLMEngine(EngineConfig(model=stories_path, max_model_len=256))
    assert gc.get_freeze_count() > 0
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    alive = [weakref.ref(engine), weakref.ref(engine.model_runner)]
    del engine
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


@pytest.mark.parametrize("draft", [False, True])
def test_a_dropped_engine_is_freed_without_a_collection(stories_path, draft):
    """No reference cycle: a dropped engine (its CUDA graphs too, and a draft model's with theirs) frees its
    memory when its last reference goes, before the next engine sizes its KV pool from free GPU memory (a
    cycle held it until then)."""
    import weakref

    spec = {"method": "draft_model", "model": stories_path, "num_speculative_tokens": 2} if draft else None
    engine = LLMEngine(EngineConfig(model=stories_path, max_model_len=64, max_num_seqs=2, speculative_config=spec))
    if engine.model_runner.graphs is None:
        engine.model_runner.capture_cuda_graphs()  # off CUDA the "graphs" replay eagerly, same objects
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    runner = engine.model_runner
    owned = [engine, runner, runner.model, runner.graphs, engine.scheduler]
    if draft:
        assert runner.proposer_graphs.decode.num_replays > 0
        owned += [runner.proposer, runner.proposer.model, runner.proposer_graphs]
    alive = [weakref.ref(o) for o in owned]
    del engine, runner, owned
    assert [ref() for ref in alive] == [None] * len(alive)
