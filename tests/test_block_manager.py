"""Block manager: allocation, ref counts, prefix-hash reuse, LRU eviction, no leaks."""

from __future__ import annotations

from mini_infer import LLM, SamplingParams
from mini_infer.block_manager import BlockManager
from mini_infer.sampling_params import SamplingParams as SP
from mini_infer.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", 0, tokens, SP())


# The bookkeeping the scheduler does for a sequence around each BlockManager call.
def match_prefix(bm: BlockManager, s: Sequence) -> None:
    s.block_table, s.block_hashes = bm.match_prefix(s.token_ids)
    s.num_computed_tokens = len(s.block_table) * bm.block_size


def allocate(bm: BlockManager, s: Sequence, num_new_tokens: int) -> bool:
    blocks = bm.allocate(max(bm.blocks_needed(s.num_computed_tokens + num_new_tokens) - len(s.block_table), 0))
    if blocks is None:
        return False
    s.block_table += blocks
    return True


def free(bm: BlockManager, s: Sequence) -> None:
    bm.free(s.block_table)
    s.block_table, s.block_hashes, s.num_computed_tokens = [], [], 0


def admit(bm: BlockManager, s: Sequence) -> None:
    match_prefix(bm, s)
    assert allocate(bm, s, s.num_tokens - s.num_computed_tokens)
    s.block_hashes += bm.cache_full_blocks(s.token_ids, s.block_table, s.block_hashes, s.num_tokens)
    s.num_computed_tokens = s.num_tokens


def test_allocate_and_free_counts():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(list(range(10)))
    assert allocate(bm, a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    a.num_computed_tokens = 10
    assert allocate(bm, a, 2)  # 12 tokens still fit in 3 blocks
    assert len(a.block_table) == 3
    assert allocate(bm, a, 3)  # 13 tokens need a 4th
    assert len(a.block_table) == 4
    b = seq(list(range(100)))
    assert not allocate(bm, b, 17)  # needs 5, only 4 free: nothing taken
    assert bm.num_free_blocks == 4 and not b.block_table
    free(bm, a)
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_prefix_hash_reuse_and_ref_counts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    admit(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])
    match_prefix(bm, b)
    assert b.num_computed_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    # a different first block breaks the chain, even though the second block's tokens match
    c = seq([99, 1, 2, 3] + list(range(4, 10)))
    match_prefix(bm, c)
    assert c.num_computed_tokens == 0


def test_fully_cached_prompt_still_computes_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(8)))
    admit(bm, a)
    b = seq(list(range(8)))
    match_prefix(bm, b)
    assert b.num_computed_tokens == 4  # the block holding the last token is recomputed


def test_freed_blocks_stay_cached_and_lru_eviction():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(8)))
    admit(bm, a)
    free(bm, a)
    assert bm.num_free_blocks == 4
    again = seq(list(range(8)) + [7])
    match_prefix(bm, again)
    assert again.num_computed_tokens == 8  # reused after free
    free(bm, again)
    # a, then b cached; a new request needing 3 fresh blocks evicts the least recently used first
    b = seq([20, 21, 22, 23, 24])
    admit(bm, b)
    free(bm, b)
    c = seq([30] * 12)
    assert allocate(bm, c, 12)
    assert bm.num_free_blocks == 1
    # b's full block was freed last, so it survived; a's head block was evicted
    probe_b = seq([20, 21, 22, 23, 99])
    match_prefix(bm, probe_b)
    assert probe_b.num_computed_tokens == 4
    probe_a = seq(list(range(8)) + [1])
    match_prefix(bm, probe_a)
    assert probe_a.num_computed_tokens == 0


def test_no_blocks_leak_after_finish_and_abort(stories_path):
    llm = LLM(stories_path, num_gpu_blocks_override=64)
    engine = llm.llm_engine
    engine.add_request("a", "Once upon a time", SamplingParams(max_tokens=30, temperature=0))
    engine.add_request("b", "Lily and Tom went to the park.", SamplingParams(max_tokens=30, seed=1))
    engine.add_request("c", "The cat", SamplingParams(max_tokens=5, n=3, seed=2))
    for _ in range(3):
        engine.step()
    assert engine.stats.num_kv_blocks_used > 0
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats.num_kv_blocks_used == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert all(b.ref_count == 0 for b in engine.scheduler.block_manager.blocks)
