"""Paged KV-cache blocks: ref-counted allocation with content-hashed prefix caching.

A full block is keyed by a chained hash of (parent block's hash, its token ids), so equal
prefixes map to equal chains. A sequence of a LoRA adapter starts its chain from the adapter's root
(LoRARequest.cache_root) instead of nothing, so adapters and the base model never share a block.
Blocks with no user stay cached in a free queue and are evicted least-recently-used first when a new
block is needed. It never touches a sequence: the scheduler keeps each one's block table and hashes,
and passes them in.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash


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
    def match_prefix(self, token_ids: list[int], root: int | None = None) -> tuple[list[int], list[int]]:
        """(block ids, hashes) of the longest cached prefix of token_ids, the blocks taken for the caller;
        root: the chain's start (a LoRA adapter's), None for the base model.

        The last token is never taken from the cache: it must run to produce logits.
        """
        blocks: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        bs = self.block_size
        parent = root
        for start in range(0, len(token_ids) - bs, bs):
            tokens = token_ids[start : start + bs]
            h = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            self._take(block_id)
            blocks.append(block_id)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def record_lookup(self, num_tokens: int, num_hits: int) -> None:
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += num_hits

    def cache_full_blocks(
        self,
        token_ids: list[int],
        block_table: list[int],
        block_hashes: list[int],
        num_tokens: int,
        root: int | None = None,
    ) -> list[int]:
        """Registers the blocks that the first num_tokens tokens fill completely, past the len(block_hashes)
        already registered; returns their hashes. root: as in match_prefix.

        Called when those tokens are scheduled: the KV is written in the same forward pass,
        before any attention reads it, so a request later in the same batch may share them.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        parent = block_hashes[-1] if block_hashes else root
        new: list[int] = []
        for i in range(len(block_hashes), num_tokens // bs):
            tokens = token_ids[i * bs : (i + 1) * bs]
            h = hash_block(parent, tokens)
            block = self.blocks[block_table[i]]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block.block_id
                block.hash, block.token_ids = h, tuple(tokens)
            new.append(h)
            parent = h
        return new

    # -- allocation ---------------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int] | None:
        """num_blocks fresh blocks (evicting cached ones, least recently used first), or None if too few."""
        if num_blocks > self.num_free_blocks:
            return None
        taken = []
        for _ in range(num_blocks):
            block_id, _ = self.free_queue.popitem(last=False)
            self._evict(block_id)
            self.blocks[block_id].ref_count = 1
            taken.append(block_id)
        return taken

    def free(self, block_table: list[int]) -> None:
        """Releases a sequence's blocks. The tail goes in first so it is evicted before the head,
        which other requests are likelier to share."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:  # holds nothing reusable: hand it out first
                    self.free_queue.move_to_end(block_id, last=False)

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
