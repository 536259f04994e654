"""Paged KV-cache blocks: ref-counted allocation with content-hashed prefix caching.

A full block is keyed by a chained hash of (parent block's hash, its token ids), so equal
prefixes map to equal chains. Blocks with no user stay cached in a free queue and are evicted
least-recently-used first when a new block is needed.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from mini_infer.sequence import Sequence


def hash_block(parent_hash: int | None, token_ids: list[int]) -> int:
    h = xxhash.xxh3_64()
    if parent_hash is not None:  # a root block hashes fewer bytes, so it never equals a child
        h.update(parent_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 blocks, least recently used first; cached ones keep their hash until evicted
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of those, found cached

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> None:
        """Gives a sequence with no blocks yet the cached blocks of its longest cached prefix.

        The last token is never taken from the cache: it must run to produce logits.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_query = seq.num_tokens - 1
        parent = None
        for start in range(0, num_query - bs + 1, bs):
            tokens = seq.token_ids[start : start + bs]
            h = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * bs

    def record_lookup(self, seq: Sequence) -> None:
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Registers the blocks that the first `num_tokens` tokens of `seq` fill completely.

        Called when those tokens are scheduled: the KV is written in the same forward pass,
        before any attention reads it, so a request later in the same batch may share them.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_tokens // bs):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = hash_block(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block.block_id
                block.hash, block.token_ids = h, tuple(tokens)
            seq.block_hashes.append(h)
            parent = h

    # -- allocation ---------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Makes room in `seq`'s block table for `num_new_tokens` more tokens; False if out of blocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            block_id, _ = self.free_queue.popitem(last=False)
            self._evict(block_id)
            self.blocks[block_id].ref_count = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Releases a sequence's blocks. The tail goes in first so it is evicted before the head,
        which other requests are likelier to share."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:  # holds nothing reusable: hand it out first
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
