"""SharedStorageConnector: KV blocks as files in a directory that every engine sees (vLLM's reference
connector, and the test vehicle). `kv_connector_extra_config={"shared_storage_path": DIR}`.

One file per block, `DIR/<layout>/<key>.kv`: a header (magic, key, byte count), then the block of every
layer. A file is written under a temporary name and renamed into place, so a reader sees a whole block
or none; one that does not read back whole (truncated, another key, another size) counts as missing.
Nothing is ever deleted: the directory grows with every distinct prompt block saved.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
from pathlib import Path

import torch

from mini_infer.kv_transfer.store_connector import BlockStore, StoreConnector

logger = logging.getLogger(__name__)

_MAGIC = b"MIKVBLK1"
_HEADER = struct.Struct("<8sQQ")  # magic, key, payload bytes


class FileBlockStore:
    def __init__(self, root: str | os.PathLike, namespace: str, block_bytes: int) -> None:
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.block_bytes = block_bytes

    def path(self, key: int) -> Path:
        return self.dir / f"{key:016x}.kv"

    def contains(self, key: int) -> bool:
        return self.path(key).is_file()

    def read(self, keys: list[int], out: torch.Tensor) -> int:
        for i, key in enumerate(keys):
            try:
                with open(self.path(key), "rb") as f:
                    header = f.read(_HEADER.size)
                    ok = len(header) == _HEADER.size and _HEADER.unpack(header) == (_MAGIC, key, self.block_bytes)
                    ok = ok and f.readinto(memoryview(out[i].numpy())) == self.block_bytes and not f.read(1)
            except FileNotFoundError:
                return i
            if not ok:
                logger.warning("KV block file %s does not read back whole: computing from there", self.path(key))
                return i
        return len(keys)

    def write(self, keys: list[int], rows: torch.Tensor) -> int:
        written = 0
        for key, row in zip(keys, rows):
            path = self.path(key)
            if path.exists():
                continue
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, key, self.block_bytes))
                f.write(memoryview(row.numpy()))
            os.replace(tmp, path)  # atomic: readers see the whole file or none
            written += 1
        return written


class SharedStorageConnector(StoreConnector):
    def make_store(self, namespace: str) -> BlockStore:
        root = self.config.kv_connector_extra_config["shared_storage_path"]
        return FileBlockStore(root, namespace, self.layout.block_bytes)
