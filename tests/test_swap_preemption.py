"""Swap preemption (preemption_mode="swap"): the block gather/scatter primitive against plain indexing,
the scheduler's swapped queue and priorities on a fake block manager, and whole engines on a tiny KV pool
whose greedy tokens must equal transformers' however often requests are swapped out and back in.

On CPU the "device" pool and the host pool are separate tensors, so a swap really copies the KV out and
back; test_swap_restores_the_kv shows that a swap-in which brings back zeros changes the tokens."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import PROMPTS, hf_greedy
from test_scheduler_unit import FakeBlockManager, add, run_step, tokens
from transformers import AutoTokenizer

from mini_infer import LLM, SamplingParams
from mini_infer.config import EngineConfig, add_engine_args
from mini_infer.entrypoints.openai.metrics import _EngineStatsCollector
from mini_infer.kv_transfer import BlockLayout, HostBlockPool, gather_blocks, scatter_blocks
from mini_infer.scheduler import Scheduler
from mini_infer.sequence import SequenceStatus
from mini_infer.worker.kv_swap import runs

BLOCK = 16
MAX_TOKENS = 48
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
TINY = dict(dtype="float32", num_gpu_blocks_override=8, max_model_len=128, preemption_mode="swap")


# ---- the primitive ------------------------------------------------------------------------------
def test_gather_scatter_match_plain_indexing():
    g = torch.Generator().manual_seed(0)
    paged = torch.randn(2, 9, 4, 2, 3, generator=g)  # K/V: the block dim is 1
    latent = torch.randn(9, 4, 5, generator=g).half()  # an MLA-like latent in another dtype: dim 0
    tensors = [paged, latent]
    layout = BlockLayout.of(tensors, num_blocks=9)
    assert layout.block_dims == (1, 0)
    assert layout.block_bytes == 2 * 4 * 2 * 3 * 4 + 4 * 5 * 2
    ids = torch.tensor([7, 2, 5])
    buffer = gather_blocks(tensors, layout, ids)
    assert buffer.shape == (3, layout.block_bytes) and buffer.dtype == torch.uint8
    paged_rows, latent_rows = layout.views(buffer)
    torch.testing.assert_close(paged_rows, paged[:, ids].movedim(1, 0), rtol=0, atol=0)
    torch.testing.assert_close(latent_rows, latent[ids], rtol=0, atol=0)
    # scattered into other blocks of fresh tensors: exactly those blocks change
    dest = [torch.zeros_like(paged), torch.zeros_like(latent)]
    to = torch.tensor([0, 8, 3])
    scatter_blocks(dest, layout, to, buffer)
    torch.testing.assert_close(dest[0][:, to], paged[:, ids], rtol=0, atol=0)
    torch.testing.assert_close(dest[1][to], latent[ids], rtol=0, atol=0)
    untouched = [b for b in range(9) if b not in (0, 8, 3)]
    assert not dest[0][:, untouched].any() and not dest[1][untouched].any()


def test_block_layout_needs_one_block_dimension():
    with pytest.raises(ValueError, match="exactly one block dimension"):
        BlockLayout.from_shapes([lambda n: (n, n, 4)], [torch.float32])


def test_host_block_pool_and_runs():
    pool = HostBlockPool(6)
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert (a, b) == ([0, 1], [2, 3, 4]) and pool.allocate(2) is None
    pool.free(a)
    assert pool.num_free_blocks == 3 and pool.allocate(3) == [0, 1, 5]
    with pytest.raises(AssertionError):
        pool.free([2, 2])
    assert runs([0, 1, 5, 6, 7, 3]) == [(0, 0, 2), (2, 5, 3), (5, 3, 1)]
    assert runs([]) == []


# ---- the scheduler ------------------------------------------------------------------------------
def _three_decoding(num_blocks: int, num_host_blocks: int):
    """a (priority 0, first), b (priority 1), c (priority 0, last): one-block prompts, prefilled; each
    next decode needs a second block (as in test_scheduler_unit.py, with swapping on)."""
    block_manager = FakeBlockManager(num_blocks)
    config = EngineConfig(model="unit-test", block_size=BLOCK, preemption_mode="swap")
    scheduler = Scheduler(config, block_manager, 10**6, num_host_blocks=num_host_blocks)
    seqs = {
        name: add(scheduler, name, BLOCK, max_tokens=3, priority=priority, arrival=arrival)
        for name, priority, arrival in (("a", 0, 0), ("b", 1, 1), ("c", 0, 2))
    }
    assert tokens(run_step(scheduler)) == {"a": BLOCK, "b": BLOCK, "c": BLOCK}
    return scheduler, block_manager, seqs


def test_the_lowest_priority_is_swapped_and_comes_back_after_the_higher_ones():
    scheduler, block_manager, seqs = _three_decoding(num_blocks=3, num_host_blocks=4)
    out = run_step(scheduler)
    assert tokens(out) == {"a": 1}  # b (lowest priority) goes first, then c (latest arrival)
    assert [s.request_id for s in scheduler.swapped] == ["b", "c"]
    assert all(seqs[n].status == SequenceStatus.SWAPPED and len(seqs[n].host_blocks) == 1 for n in "bc")
    assert len(out.blocks_to_swap_out) == 2 and not out.blocks_to_swap_in
    assert scheduler.num_swap_outs == scheduler.num_preemptions == 2
    new = add(scheduler, "new", 4, priority=1, arrival=3)  # b's priority, later: it waits behind b
    assert tokens(run_step(scheduler)) == {"a": 1}  # a finishes; nothing comes back in a preempting step
    out = run_step(scheduler)
    # c (priority 0) comes back first; b's two blocks do not fit beside it, and "new" would fit in the
    # block left but waits for b
    assert tokens(out) == {"c": 1} and len(out.blocks_to_swap_in) == 1 and block_manager.num_free_blocks == 1
    assert seqs["c"].status == SequenceStatus.RUNNING and seqs["c"].num_computed_tokens == BLOCK + 1
    assert new.status == SequenceStatus.WAITING and scheduler.num_swap_ins == 1
    while not seqs["c"].is_finished:
        run_step(scheduler)
    assert tokens(run_step(scheduler)) == {"b": 1, "new": 4}
    assert scheduler.host_blocks.num_free_blocks == 4 and scheduler.num_swap_ins == 2


def test_a_higher_priority_newcomer_does_not_wait_for_a_swapped_one():
    scheduler, block_manager, seqs = _three_decoding(num_blocks=4, num_host_blocks=4)
    assert tokens(run_step(scheduler)) == {"a": 1, "c": 1}  # b swapped
    urgent = add(scheduler, "urgent", 4, priority=0, arrival=3)
    run_step(scheduler)  # a and c finish, freeing their blocks
    assert tokens(run_step(scheduler)) == {"b": 1, "urgent": 4}
    assert urgent.status == SequenceStatus.RUNNING


def test_a_full_host_pool_falls_back_to_recompute():
    scheduler, _, seqs = _three_decoding(num_blocks=3, num_host_blocks=1)
    assert tokens(run_step(scheduler)) == {"a": 1}
    assert seqs["b"].status == SequenceStatus.SWAPPED  # the first victim takes the only host block
    assert seqs["c"].status == SequenceStatus.WAITING and not seqs["c"].block_table  # recomputed later
    assert scheduler.num_preemptions == 2 and scheduler.num_swap_outs == 1


def test_aborting_a_swapped_sequence_frees_its_host_blocks():
    scheduler, block_manager, seqs = _three_decoding(num_blocks=4, num_host_blocks=4)
    run_step(scheduler)
    assert seqs["b"].status == SequenceStatus.SWAPPED and scheduler.host_blocks.num_free_blocks == 3
    scheduler.finish(seqs["b"], "abort")
    assert seqs["b"].is_finished and not scheduler.swapped and scheduler.host_blocks.num_free_blocks == 4


# ---- whole engines ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def expected(stories_path: str) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(stories_path)
    out = []
    for prompt in PROMPTS:
        ids = hf_greedy(stories_path, tok.encode(prompt), MAX_TOKENS)
        if 1 in ids or 2 in ids:  # HF stops at either EOS id of the generation config
            ids = ids[: min(i for i, t in enumerate(ids) if t in (1, 2)) + 1]
        out.append(ids)
    return out


def _no_leaks(llm: LLM) -> None:
    stats = llm.llm_engine.stats
    assert stats.num_kv_blocks_used == 0 and stats.num_host_blocks_used == 0 and stats.num_swapped == 0


def _watch_shared_swaps(llm: LLM) -> list[bool]:
    """Records, for each swap-out, whether the victim shared a block with another sequence."""
    scheduler = llm.llm_engine.scheduler
    preempt, shared = scheduler._preempt, []

    def watched(seq):
        before = scheduler.num_swap_outs
        was_shared = any(scheduler.block_manager.blocks[b].ref_count > 1 for b in seq.block_table)
        preempt(seq)
        if scheduler.num_swap_outs > before:
            shared.append(was_shared)

    scheduler._preempt = watched
    return shared


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_swapping_keeps_greedy_tokens(stories_path, expected, prefix_caching):
    # 8 blocks of 16 tokens cannot hold 8 sequences of up to ~70 tokens: requests are swapped out and in
    llm = LLM(stories_path, swap_space=0.01, enable_prefix_caching=prefix_caching, **TINY)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.llm_engine.stats
    assert stats.num_swap_outs > 0 and stats.num_swap_ins == stats.num_swap_outs
    assert stats.num_preemptions == stats.num_swap_outs  # the host pool never ran out
    _no_leaks(llm)


def test_swapping_shared_prefix_blocks(stories_path, expected):
    # n=2 greedy samples share every prompt block; a swapped one copies them and leaves them to its twin
    llm = LLM(stories_path, swap_space=0.01, **TINY)
    shared = _watch_shared_swaps(llm)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, n=2)
    outs = llm.generate(PROMPTS[2:6], params, use_tqdm=False)
    for out, ids in zip(outs, expected[2:6], strict=True):
        assert [c.token_ids for c in out.outputs] == [ids, ids]
    assert any(shared), "no swap-out of a sequence sharing blocks happened"
    _no_leaks(llm)


def test_priorities_decide_who_is_swapped(stories_path, expected):
    # half the requests urgent (priority 0), half not (1): a victim is always the lowest-priority, latest
    # running sequence, so no urgent one is swapped while a non-urgent one runs
    llm = LLM(stories_path, swap_space=0.01, **TINY)
    scheduler = llm.llm_engine.scheduler
    preempt, victims = scheduler._preempt, []

    def watched(seq):
        assert all(other.sort_key() < seq.sort_key() for other in scheduler.running)  # popped from there
        victims.append(seq.priority)
        preempt(seq)

    scheduler._preempt = watched
    priority = [i % 2 for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, GREEDY, priority=priority, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert victims and victims.count(1) > victims.count(0)
    _no_leaks(llm)


def test_swap_restores_the_kv(stories_path, expected, monkeypatch):
    import mini_infer.worker.kv_swap as kv_swap

    scatter = kv_swap.scatter_blocks
    monkeypatch.setattr(kv_swap, "scatter_blocks", lambda t, layout, ids, buf: scatter(t, layout, ids, buf * 0))
    llm = LLM(stories_path, swap_space=0.01, enable_prefix_caching=False, **TINY)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] != expected


def test_host_pool_exhaustion_falls_back_to_recompute(stories_path, expected):
    block_bytes = LLM(stories_path, **TINY).llm_engine.model_runner.kv_cache.block_bytes
    # room for 3 blocks: one or two victims at a time, the others recompute
    llm = LLM(stories_path, swap_space=3 * block_bytes / 2**30, async_scheduling=False, **TINY)
    assert llm.llm_engine.stats.num_host_blocks_total == 3
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.llm_engine.stats
    assert 0 < stats.num_swap_outs < stats.num_preemptions
    _no_leaks(llm)


def test_aborting_swapped_requests_leaks_nothing(stories_path, expected):
    llm = LLM(stories_path, swap_space=0.01, **TINY)
    engine = llm.llm_engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    aborted: set[str] = set()
    finished: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        swapped = {s.request_id for s in engine.scheduler.swapped} - aborted
        if swapped and len(aborted) < 3:
            victim = min(swapped)
            engine.abort_request(victim)
            aborted.add(victim)
    assert aborted and not aborted & set(finished)
    for rid, ids in finished.items():
        assert ids == expected[int(rid)]
    assert len(finished) == len(PROMPTS) - len(aborted)
    _no_leaks(llm)


def test_qwen3_swapping_keeps_greedy_tokens(qwen3_path):
    prompts = [[1 + (7 * i + j) % 500 for j in range(20 + 9 * i)] for i in range(4)]
    llm = LLM(qwen3_path, dtype="float32", num_gpu_blocks_override=6, max_model_len=96, preemption_mode="swap")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(qwen3_path, p, 24) for p in prompts]
    assert llm.llm_engine.stats.num_swap_outs > 0
    _no_leaks(llm)


def test_a_draft_models_cache_is_swapped_with_the_targets(stories_path, qwen3_path):
    """Speculative decoding with a draft model: its KV sits in the same blocks, so a host block carries
    both models' layers; the tokens stay those of an engine that never preempts."""
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    plain = LLM(stories_path, dtype="float32")
    expected = [o.outputs[0].token_ids for o in plain.generate(PROMPTS[:4], params, use_tqdm=False)]
    spec = {"method": "draft_model", "model": qwen3_path, "num_speculative_tokens": 3}
    llm = LLM(stories_path, speculative_config=spec, swap_space=0.01, **{**TINY, "num_gpu_blocks_override": 10})
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], params, use_tqdm=False)] == expected
    stats = llm.llm_engine.stats
    assert stats.num_swap_outs > 0 and stats.spec_num_draft_tokens > 0
    _no_leaks(llm)


# ---- settings and metrics -----------------------------------------------------------------------
def test_settings_are_validated_and_have_flags():
    for bad in ({"preemption_mode": "drop"}, {"swap_space": -1}, {"swap_space": float("nan")}, {"swap_space": "4"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(model="m", **bad)
    args = add_engine_args(argparse.ArgumentParser()).parse_args(["--preemption-mode", "swap", "--swap-space", "0.5"])
    config = EngineConfig.from_cli_args(argparse.Namespace(model="m", **vars(args)))
    assert (config.preemption_mode, config.swap_space) == ("swap", 0.5)
    assert EngineConfig(model="m").preemption_mode == "recompute"


def test_swap_metrics_under_vllm_names(stories_path):
    llm = LLM(stories_path, swap_space=0.01, **TINY)
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    stats = llm.llm_engine.stats
    families = {f.name: f.samples[0].value for f in _EngineStatsCollector(lambda: stats, "m").collect()}
    assert families["mini_infer:num_swap_outs"] == stats.num_swap_outs > 0
    assert families["mini_infer:num_swap_ins"] == stats.num_swap_ins
    assert families["mini_infer:num_requests_swapped"] == 0 and families["mini_infer:cpu_cache_usage_perc"] == 0


def test_tensor_parallel_ranks_swap_their_shards():
    """Two ranks (gloo, CPU): each copies its shard of the same blocks to its own host pool; the tokens
    and logprobs stay transformers'."""
    from test_tensor_parallel import ENGINE, STORIES, _check

    llm = LLM(str(STORIES), preemption_mode="swap", swap_space=0.01, device="cpu", **ENGINE)  # also on a GPU host
    try:
        _check(llm, str(STORIES))
        assert llm.llm_engine.stats.num_swap_outs > 0
        _no_leaks(llm)
    finally:
        llm.llm_engine.shutdown()


def test_an_mla_latent_cache_is_swapped(tmp_path):
    """DeepSeek-V2's MLA layers keep one latent per slot, blocks on dim 0: the layout finds it. The tokens
    equal those of an engine that never preempts (itself checked against transformers in
    test_deepseek_mla.py)."""
    import test_deepseek_mla as mla

    path = mla._save_random(tmp_path, mla.CONFIGS["deepseek-v2"]())
    expected = [o.outputs[0].token_ids for o in mla._generate(LLM(path, dtype="float32"))]
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=3, max_model_len=48, preemption_mode="swap")
    assert [o.outputs[0].token_ids for o in mla._generate(llm)] == expected
    assert llm.llm_engine.stats.num_swap_outs > 0
    _no_leaks(llm)
