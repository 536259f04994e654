"""Host block ids for swapped-out KV: which rows of the host pool are free. Scheduler side, no tensors.

Blocks are handed out lowest id first, so a request's host blocks tend to form one contiguous run and
its swap-out / swap-in is one copy (the worker copies each run of consecutive ids at once).
"""

from __future__ import annotations


class HostBlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # kept sorted

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, num_blocks: int) -> list[int] | None:
        """num_blocks host block ids, or None when the pool has fewer free."""
        if num_blocks > len(self._free):
            return None
        taken, self._free = self._free[:num_blocks], self._free[num_blocks:]
        return taken

    def free(self, block_ids: list[int]) -> None:
        if not block_ids:
            return
        free = set(self._free)
        if any(b in free or not 0 <= b < self.num_blocks for b in block_ids) or len(set(block_ids)) != len(block_ids):
            raise AssertionError(f"host blocks {block_ids} freed twice or out of range")
        self._free = sorted(free.union(block_ids))
