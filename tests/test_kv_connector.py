"""KV connectors (kv_transfer_config): a producer engine prefills and saves prompt KV, a consumer engine
loads it instead of computing it. The consumer's greedy tokens must equal one plain engine's; its stats
must show the prompt tokens loaded (not scheduled); a missing, partial or damaged transfer falls back to
computing the rest; and a consumer given wrong KV (zeros) changes its tokens, so the loaded KV is used."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from mini_infer import LLM, SamplingParams
from mini_infer.config import EngineConfig, add_engine_args
from mini_infer.entrypoints.openai.metrics import _EngineStatsCollector
from mini_infer.kv_transfer.shared_memory import SharedMemoryBlockStore
from mini_infer.kv_transfer.shared_storage import FileBlockStore
from mini_infer.kv_transfer.store_connector import prompt_block_hashes

BLOCK = 16
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big dog"
)
# 45, 18 (its first block is the first one's) and 56 tokens: 2 + 0 + 3 blocks to load, 1 hit locally
PROMPTS = [STORY, STORY[:60], "Ben had a red ball. " * 6]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
ENGINE = dict(dtype="float32", num_gpu_blocks_override=64)
CONNECTORS = ["SharedStorageConnector", "SharedMemoryConnector"]


def transfer(connector: str, role: str, directory) -> dict:
    extra = {"shared_storage_path": str(directory), "shared_memory_dir": str(directory), "shared_memory_gib": 0.01}
    return {"kv_connector": connector, "kv_role": role, "kv_connector_extra_config": extra}


@pytest.fixture(scope="module")
def single(stories_path):
    """One plain engine: the tokens to match, and its stats."""
    llm = LLM(stories_path, **ENGINE)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.llm_engine.stats, [o.prompt_token_ids for o in outs]


def produce(stories_path: str, connector: str, directory) -> LLM:
    producer = LLM(stories_path, kv_transfer_config=transfer(connector, "kv_producer", directory), **ENGINE)
    producer.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    return producer


def consume(stories_path: str, connector: str, directory, **kwargs) -> tuple[list[list[int]], object]:
    consumer = LLM(stories_path, kv_transfer_config=transfer(connector, "kv_consumer", directory), **ENGINE, **kwargs)
    outs = consumer.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], consumer.llm_engine.stats


def blocks_to_load(prompt_ids: list[list[int]]) -> int:
    """Blocks a consumer loads: each prompt's full blocks before its last token, less the local hits."""
    seen, n = set(), 0
    for ids in prompt_ids:
        for h in prompt_block_hashes(ids, BLOCK)[: (len(ids) - 1) // BLOCK]:
            n += h not in seen
            seen.add(h)
    return n


@pytest.mark.parametrize("connector", CONNECTORS)
def test_consumer_loads_the_prompts_and_matches_one_engine(stories_path, single, tmp_path, connector):
    tokens, stats, prompt_ids = single
    producer = produce(stories_path, connector, tmp_path)
    saved = {h for ids in prompt_ids for h in prompt_block_hashes(ids, BLOCK)}
    assert producer.llm_engine.stats.kv_transfer_saved_tokens == len(saved) * BLOCK == 5 * BLOCK
    assert producer.llm_engine.stats.kv_transfer_loaded_tokens == 0
    got, cstats = consume(stories_path, connector, tmp_path)
    assert got == tokens
    loaded = blocks_to_load(prompt_ids) * BLOCK
    assert cstats.kv_transfer_loaded_tokens == loaded == 5 * BLOCK and cstats.kv_transfer_saved_tokens == 0
    assert cstats.prompt_tokens == stats.prompt_tokens  # the prompts count whole; their loaded part is not run
    assert cstats.num_scheduled_tokens == stats.num_scheduled_tokens - loaded
    assert cstats.prefix_cache_hits == stats.prefix_cache_hits == BLOCK  # the loaded blocks are cached locally
    families = {f.name: f.samples[0].value for f in _EngineStatsCollector(lambda: cstats, "m").collect()}
    assert families["mini_infer:kv_transfer_loaded_tokens"] == loaded
    assert families["mini_infer:kv_transfer_saved_tokens"] == 0


def test_chunked_prefill_and_both_roles(stories_path, single, tmp_path):
    """A kv_both engine saves, a second one loads; with a 16-token budget the rest is prefilled in chunks
    (loaded tokens take no budget)."""
    tokens, stats, prompt_ids = single
    first = LLM(stories_path, kv_transfer_config=transfer("SharedStorageConnector", "kv_both", tmp_path), **ENGINE)
    assert [o.outputs[0].token_ids for o in first.generate(PROMPTS, GREEDY, use_tqdm=False)] == tokens
    assert first.llm_engine.stats.kv_transfer_loaded_tokens == 0
    second = LLM(
        stories_path,
        kv_transfer_config=transfer("SharedStorageConnector", "kv_both", tmp_path),
        max_num_batched_tokens=16,
        **ENGINE,
    )
    assert [o.outputs[0].token_ids for o in second.generate(PROMPTS, GREEDY, use_tqdm=False)] == tokens
    assert second.llm_engine.stats.kv_transfer_loaded_tokens == blocks_to_load(prompt_ids) * BLOCK
    assert second.llm_engine.stats.kv_transfer_saved_tokens == 0  # all there already


def test_missing_partial_and_damaged_transfers_fall_back_to_prefill(stories_path, single, tmp_path):
    tokens, stats, prompt_ids = single
    # nothing saved: everything is computed
    got, cstats = consume(stories_path, "SharedStorageConnector", tmp_path)
    assert got == tokens and cstats.kv_transfer_loaded_tokens == 0
    assert cstats.num_scheduled_tokens == stats.num_scheduled_tokens
    producer = produce(stories_path, "SharedStorageConnector", tmp_path)
    store = producer.llm_engine.kv_connector.store
    assert isinstance(store, FileBlockStore)
    ben = prompt_block_hashes(prompt_ids[2], BLOCK)
    store.path(ben[1]).unlink()  # the third prompt keeps only its first block
    path = store.path(prompt_block_hashes(prompt_ids[0], BLOCK)[1])
    path.write_bytes(path.read_bytes()[:-1])  # the first prompt's second block is truncated
    got, cstats = consume(stories_path, "SharedStorageConnector", tmp_path)
    assert got == tokens
    assert cstats.kv_transfer_loaded_tokens == 2 * BLOCK  # one block of each
    assert cstats.num_scheduled_tokens == stats.num_scheduled_tokens - 2 * BLOCK


def test_the_loaded_kv_is_what_the_consumer_attends_to(stories_path, single, tmp_path):
    """Blocks with valid headers but zero KV: the consumer loads them and its tokens change."""
    tokens, _, prompt_ids = single
    store = produce(stories_path, "SharedStorageConnector", tmp_path).llm_engine.kv_connector.store
    for h in {h for ids in prompt_ids for h in prompt_block_hashes(ids, BLOCK)}:
        data = store.path(h).read_bytes()
        store.path(h).write_bytes(data[:24] + bytes(len(data) - 24))
    got, cstats = consume(stories_path, "SharedStorageConnector", tmp_path)
    assert cstats.kv_transfer_loaded_tokens == 5 * BLOCK
    assert got != tokens


def test_shared_memory_store_slots_eviction_and_layout(tmp_path):
    path = tmp_path / "segment"
    a = SharedMemoryBlockStore(path, block_bytes=8, size_bytes=8 * 4)  # 4 slots
    b = SharedMemoryBlockStore(path, block_bytes=8, size_bytes=8 * 1000)  # opens a's segment: its size
    assert a.num_slots == b.num_slots == 4
    rows = torch.arange(6 * 8, dtype=torch.uint8).view(6, 8)
    assert a.write([10, 11], rows[:2]) == 2 and b.write([11], rows[1:2]) == 0  # stored once
    out = torch.zeros(3, 8, dtype=torch.uint8)
    assert b.read([10, 11, 12], out) == 2 and torch.equal(out[:2], rows[:2])
    assert b.write([12, 13, 14], rows[2:5]) == 3  # the segment is full: 10, the oldest, makes room for 14
    assert not a.contains(10) and all(a.contains(k) for k in (11, 12, 13, 14))
    assert a.read([11, 12, 13, 14], out := torch.zeros(4, 8, dtype=torch.uint8)) == 4
    assert torch.equal(out, rows[1:5])
    with pytest.raises(ValueError, match="blocks of 8 bytes"):
        SharedMemoryBlockStore(path, block_bytes=16, size_bytes=64)


PRODUCER = """
import sys
from mini_infer import LLM, SamplingParams
sys.path.insert(0, {tests!r})
from test_kv_connector import ENGINE, PROMPTS, transfer
llm = LLM({model!r}, kv_transfer_config=transfer("SharedMemoryConnector", "kv_producer", {dir!r}), **ENGINE)
llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
print(llm.llm_engine.stats.kv_transfer_saved_tokens)
"""


def test_shared_memory_between_two_processes(stories_path, single, tmp_path):
    """The producer is another process: the consumer finds its blocks in the shared segment."""
    tokens, _, prompt_ids = single
    script = PRODUCER.format(
        tests=str(__import__("pathlib").Path(__file__).parent), model=stories_path, dir=str(tmp_path)
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == 5 * BLOCK
    got, cstats = consume(stories_path, "SharedMemoryConnector", tmp_path)
    assert got == tokens and cstats.kv_transfer_loaded_tokens == blocks_to_load(prompt_ids) * BLOCK


def test_kv_transfer_config_is_validated(stories_path):
    ok = {"kv_connector": "SharedStorageConnector", "kv_connector_extra_config": {"shared_storage_path": "/tmp/x"}}
    bad = [
        ({"kv_connector": "Nixl"}, "kv_connector must be one of"),
        ({**ok, "kv_role": "kv_sender"}, "kv_role must be one of"),
        ({"kv_connector": "SharedStorageConnector"}, "shared_storage_path"),
        ({**ok, "kv_rank": 0}, "unknown keys"),
        ("{not json", "not valid JSON"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            EngineConfig(model=stories_path, kv_transfer_config=value)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model=stories_path, kv_transfer_config=ok, tensor_parallel_size=2)
    parser = add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--kv-transfer-config", '{"kv_connector": "SharedMemoryConnector", "kv_role": "kv_consumer"}']
    )
    config = EngineConfig.from_cli_args(argparse.Namespace(model=stories_path, **vars(args)))
    assert config.kv_transfer_config.kv_connector == "SharedMemoryConnector" and config.kv_transfer_config.is_consumer
    assert not config.kv_transfer_config.is_producer


def test_fp8_kv_blocks_move_as_bytes(stories_path, tmp_path):
    """kv_cache_dtype="fp8": blocks move as their bytes; the consumer equals one fp8 engine."""
    fp8 = dict(kv_cache_dtype="fp8")
    plain = LLM(stories_path, **ENGINE, **fp8).generate(PROMPTS, GREEDY, use_tqdm=False)
    producer = LLM(
        stories_path, kv_transfer_config=transfer("SharedStorageConnector", "kv_producer", tmp_path), **ENGINE, **fp8
    )
    producer.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    got, cstats = consume(stories_path, "SharedStorageConnector", tmp_path, **fp8)
    assert got == [o.outputs[0].token_ids for o in plain] and cstats.kv_transfer_loaded_tokens == 5 * BLOCK
    # a float32 engine's blocks live in another namespace: it finds nothing of the fp8 ones
    _, other = consume(stories_path, "SharedStorageConnector", tmp_path)
    assert other.kv_transfer_loaded_tokens == 0


@pytest.mark.parametrize("connector", CONNECTORS)
def test_kv_of_another_model_is_never_loaded(stories_path, single, tmp_path, connector):
    """A consumer of the same architecture but other weights (here a copy of stories260K with one weight
    changed, in another folder) shares the store and loads nothing from it: its prompts are prefilled."""
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(stories_path, other)
    weights = next(other.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("embed_tokens.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    store = tmp_path / "store"
    store.mkdir()
    produce(stories_path, connector, store)
    _, stats = consume(str(other), connector, store)
    assert stats.kv_transfer_loaded_tokens == 0
    assert consume(stories_path, connector, store)[1].kv_transfer_loaded_tokens > 0  # its own model does load
