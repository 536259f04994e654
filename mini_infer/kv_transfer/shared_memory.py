"""SharedMemoryConnector: KV blocks in one shared-memory segment for engines on the same host.

`kv_connector_extra_config={"shared_memory_gib": 4, "shared_memory_name": "mini-infer-kv",
"shared_memory_dir": "/dev/shm"}` (those are the defaults, except 1 GiB). The segment is a file under
/dev/shm (memory, not disk), mapped by every engine that names it; the first one creates it at its size:

    header   magic, block_bytes, num_slots, clock        (uint64 each)
    table    num_slots x (key, stamp)                     stamp 0: empty; else the clock at its write
    data     num_slots x block_bytes                      one block of every layer per slot

A key lives in one of 16 slots after `key % num_slots`; a write into a full window replaces its oldest
slot, so the segment holds the most recent blocks and never grows (unlike SharedStorageConnector's files).
Readers take a shared flock on the segment and writers an exclusive one, so a block is never read while
it is being replaced; a reader copies what it found before releasing the lock, so a later eviction cannot
touch a request already admitted.

On CUDA a block goes device -> pinned host buffer -> segment and back: host shared memory, not a
device-to-device copy (CUDA IPC between the two engines' pools is not done).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mini_infer.kv_transfer.store_connector import BlockStore, StoreConnector

_MAGIC = 0x4D494B5653484D31  # "MIKVSHM1"
_PROBES = 16
_HEADER_WORDS = 8


def _data_offset(num_slots: int) -> int:
    table_end = 8 * (_HEADER_WORDS + 2 * num_slots)
    return -(-table_end // mmap.PAGESIZE) * mmap.PAGESIZE


class SharedMemoryBlockStore:
    def __init__(self, path: str | os.PathLike, block_bytes: int, size_bytes: int) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked(fcntl.LOCK_EX):
            size = os.fstat(self.fd).st_size
            num_slots = max(1, size_bytes // block_bytes)
            created = size == 0  # the first engine makes it
            if created:
                size = _data_offset(num_slots) + num_slots * block_bytes
                os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size)
            self.header = np.frombuffer(self.mm, dtype=np.uint64, count=_HEADER_WORDS)
            if created:
                self.header[:4] = (_MAGIC, block_bytes, num_slots, 0)
            if int(self.header[0]) != _MAGIC or int(self.header[1]) != block_bytes:
                raise ValueError(
                    f"shared memory segment {self.path} holds blocks of {int(self.header[1])} bytes, not "
                    f"{block_bytes}: another layout wrote it; give a new shared_memory_name or delete it"
                )
        self.num_slots = int(self.header[2])
        self.table = np.frombuffer(
            self.mm, dtype=np.uint64, count=2 * self.num_slots, offset=8 * _HEADER_WORDS
        ).reshape(self.num_slots, 2)
        data = torch.frombuffer(
            self.mm, dtype=torch.uint8, count=self.num_slots * block_bytes, offset=_data_offset(self.num_slots)
        )
        self.data = data.view(self.num_slots, block_bytes)

    @contextmanager
    def _locked(self, kind: int):
        fcntl.flock(self.fd, kind)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _window(self, key: int) -> list[int]:
        return [(key + p) % self.num_slots for p in range(min(_PROBES, self.num_slots))]

    def _find(self, key: int) -> int:
        for slot in self._window(key):
            if self.table[slot, 1] and int(self.table[slot, 0]) == key:
                return slot
        return -1

    def contains(self, key: int) -> bool:
        with self._locked(fcntl.LOCK_SH):
            return self._find(key) >= 0

    def read(self, keys: list[int], out: torch.Tensor) -> int:
        with self._locked(fcntl.LOCK_SH):
            for i, key in enumerate(keys):
                slot = self._find(key)
                if slot < 0:
                    return i
                out[i].copy_(self.data[slot])
        return len(keys)

    def write(self, keys: list[int], rows: torch.Tensor) -> int:
        written = 0
        with self._locked(fcntl.LOCK_EX):
            for key, row in zip(keys, rows):
                if self._find(key) >= 0:
                    continue
                slot = min(self._window(key), key=lambda s: int(self.table[s, 1]))  # empty (0) or oldest
                clock = int(self.header[3]) + 1
                self.header[3] = clock
                self.table[slot, 1] = 0  # empty while it is rewritten (readers wait on the lock anyway)
                self.data[slot].copy_(row)
                self.table[slot] = (key, clock)
                written += 1
        return written


class SharedMemoryConnector(StoreConnector):
    def make_store(self, namespace: str) -> BlockStore:
        extra = self.config.kv_connector_extra_config
        name = extra.get("shared_memory_name", "mini-infer-kv")
        path = Path(extra.get("shared_memory_dir", "/dev/shm")) / f"{name}-{namespace}"
        size = int(float(extra.get("shared_memory_gib", 1.0)) * 2**30)
        return SharedMemoryBlockStore(path, self.layout.block_bytes, size)
