"""A KV connector over a store of blocks keyed by the prompt's block hashes: the logic that both shipped
connectors share (SharedStorageConnector: files; SharedMemoryConnector: a /dev/shm segment).

Keys are the block manager's chained xxhash of each full prompt block (`hash_block`), so a key names the
whole prefix up to and including its block, and the longest prefix of a prompt's keys found in the store
is what a consumer can load. The keys are computed here, whether or not prefix caching is on.

- Producer: after each step, the full prompt blocks that step computed (and, at a request's first step,
  the ones it found in the local prefix cache) are gathered into one [n, block_bytes] buffer
  (kv_transfer/block_copy.py), copied to the host and written, skipping keys already stored.
- Consumer: when the scheduler considers a waiting request, the blocks after its local prefix-cache hit
  are read from the store into a host buffer at once, stopping at the first key that is missing or whose
  block does not read back whole. So a missing or partial transfer is found before anything is scheduled
  on it, and the request computes from where the loaded prefix ends. Once admitted, its rows go to the
  step's metadata and are scattered into its new blocks before the forward pass; the scheduler then
  publishes those blocks to the prefix cache like computed ones.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

import torch
import xxhash

from mini_infer.block_manager import hash_block
from mini_infer.kv_transfer.block_copy import BlockLayout, gather_blocks, scatter_blocks
from mini_infer.kv_transfer.config import KVTransferConfig
from mini_infer.kv_transfer.connector_base import KVConnectorBase, KVConnectorMetadata

if TYPE_CHECKING:
    from mini_infer.scheduler import SchedulerOutput
    from mini_infer.sequence import Sequence
    from mini_infer.worker.kv_cache import KVCache

logger = logging.getLogger(__name__)


class BlockStore(Protocol):
    """Blocks of block_bytes bytes (one block of every layer, as gather_blocks lays them out) by key."""

    def contains(self, key: int) -> bool: ...

    def read(self, keys: list[int], out: torch.Tensor) -> int:
        """Reads the longest prefix of keys that is stored whole into out's rows; returns its length."""
        ...

    def write(self, keys: list[int], rows: torch.Tensor) -> int:
        """Stores rows[i] under keys[i] where that key is not stored yet; returns how many it wrote."""
        ...


def layout_namespace(layout: BlockLayout, block_size: int, dtype: torch.dtype, model_id: str = "") -> str:
    """A name for KV of this shape and model: engines whose blocks differ in shape or dtype (the pool's,
    since the layout copies float8 as bytes), or whose models differ (`model_id`: two fine-tunes of one
    architecture have blocks of one shape and different values), never share keys."""
    shape = repr((block_size, str(dtype), layout.block_dims, layout.block_shapes, [str(d) for d in layout.dtypes]))
    return f"bs{block_size}-{xxhash.xxh64((shape + model_id).encode()).hexdigest()}"


def prompt_block_hashes(prompt_token_ids: list[int], block_size: int, root: int | None = None) -> list[int]:
    """The chained hash of each full block of the prompt (the block manager's prefix-cache keys); root: the
    chain's start, a LoRA adapter's (Sequence.cache_root), so adapters never load each other's KV."""
    hashes, parent = [], root
    for start in range(0, len(prompt_token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, prompt_token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


class StoreConnector(KVConnectorBase):
    def __init__(self, config: KVTransferConfig, kv_cache: KVCache, model_id: str = "") -> None:
        """model_id: what computed the KV (engine.py: the resolved model folder, its dtype, quantization and,
        for dummy weights, their seed)."""
        self.config = config
        self.block_size = kv_cache.block_size
        self.register_kv_caches(kv_cache)
        namespace = layout_namespace(self.layout, self.block_size, kv_cache.dtype, model_id)
        self.store: BlockStore = self.make_store(namespace)
        self.num_loaded_tokens = self.num_saved_tokens = 0
        self._hashes: dict[int, list[int]] = {}  # seq id -> its prompt's block hashes
        self._staged: dict[int, tuple[int, torch.Tensor]] = {}  # seq id -> (first block, rows read for it)
        self._saved_upto: dict[int, int] = {}  # seq id -> prompt blocks already planned for saving
        self._loads: list[tuple[list[int], torch.Tensor]] = []  # admitted since the last step: (blocks, rows)

    def make_store(self, namespace: str) -> BlockStore:
        raise NotImplementedError

    def _prompt_hashes(self, seq: Sequence) -> list[int]:
        if seq.seq_id not in self._hashes:
            self._hashes[seq.seq_id] = prompt_block_hashes(seq.prompt_token_ids, self.block_size, seq.cache_root)
        return self._hashes[seq.seq_id]

    # -- scheduler side -----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, seq: Sequence, num_computed_tokens: int) -> int:
        if not self.config.is_consumer:
            return 0
        first, last = num_computed_tokens // self.block_size, (seq.num_prompt_tokens - 1) // self.block_size
        if first >= last:
            return 0
        staged = self._staged.get(seq.seq_id)
        if staged is not None and staged[0] == first and len(staged[1]) == last - first:
            return len(staged[1]) * self.block_size  # read in full by an earlier look: it waited for blocks
        keys = self._prompt_hashes(seq)[first:last]
        rows = torch.empty(len(keys), self.layout.block_bytes, dtype=torch.uint8, pin_memory=self._cuda)
        found = self.store.read(keys, rows)
        self._staged[seq.seq_id] = (first, rows[:found])
        return found * self.block_size

    def update_state_after_alloc(self, seq: Sequence, block_ids: list[int], num_external_tokens: int) -> None:
        first, rows = self._staged.pop(seq.seq_id)
        n = num_external_tokens // self.block_size
        self._loads.append((block_ids[first : first + n], rows[:n]))
        self.num_loaded_tokens += num_external_tokens

    def build_connector_meta(self, out: SchedulerOutput) -> KVConnectorMetadata | None:
        meta = KVConnectorMetadata()
        if self._loads:
            meta.load_block_ids = [b for blocks, _ in self._loads for b in blocks]
            if len(self._loads) == 1:
                meta.load_rows = self._loads[0][1]
            else:  # one pinned buffer, so the host-to-device copy stays asynchronous
                meta.load_rows = torch.empty(
                    len(meta.load_block_ids), self.layout.block_bytes, dtype=torch.uint8, pin_memory=self._cuda
                )
                torch.cat([rows for _, rows in self._loads], out=meta.load_rows)
            self._loads = []
        if self.config.is_producer:
            planned: set[int] = set()
            for s in out.seqs:
                seq = s.seq
                full = min(s.start + s.num_new_tokens, seq.num_prompt_tokens) // self.block_size
                done = self._saved_upto.get(seq.seq_id, 0)
                if full <= done:
                    continue
                self._saved_upto[seq.seq_id] = full
                for i, key in enumerate(self._prompt_hashes(seq)[done:full], start=done):
                    if key not in planned and not self.store.contains(key):
                        planned.add(key)
                        meta.save_block_ids.append(seq.block_table[i])
                        meta.save_hashes.append(key)
        return meta or None

    def request_finished(self, seq: Sequence) -> None:
        for kept in (self._hashes, self._staged, self._saved_upto):
            kept.pop(seq.seq_id, None)

    # -- worker side --------------------------------------------------------------------------
    def register_kv_caches(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self.layout = kv_cache.layout
        self._cuda = kv_cache.device.type == "cuda"

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.int64)
        return t.pin_memory().to(self.kv_cache.device, non_blocking=True) if self._cuda else t

    def start_load_kv(self, meta: KVConnectorMetadata) -> None:
        if not meta.load_block_ids:
            return
        rows = meta.load_rows.to(self.kv_cache.device, non_blocking=True) if self._cuda else meta.load_rows
        scatter_blocks(self.kv_cache.copy_views, self.layout, self._ids(meta.load_block_ids), rows)

    def wait_for_save(self, meta: KVConnectorMetadata) -> None:
        if not meta.save_block_ids:
            return
        rows = gather_blocks(self.kv_cache.copy_views, self.layout, self._ids(meta.save_block_ids)).cpu()
        written = self.store.write(meta.save_hashes, rows)
        self.num_saved_tokens += written * self.block_size
