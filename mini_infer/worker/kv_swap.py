"""Swap space: a host pool of KV blocks and the batched copies that move blocks between it and the
device pool (swap preemption; see docs/preemption.md).

The host pool is one [num_host_blocks, block_bytes] uint8 tensor, pinned on CUDA: a host block holds a
device block of every layer (kv_transfer/block_copy.py). A swap-out gathers the request's device blocks
into a contiguous device buffer in the compute stream (ordered after the step that wrote them, and before
the next one overwrites them) and copies that buffer to the host on a side stream, one copy per run of
consecutive host blocks, so the transfer overlaps the next forward pass. A swap-in copies host runs into a
device buffer on the side stream (overlapping the step still queued before it), and the compute stream
waits for that copy alone before scattering the buffer into the new blocks. Every host-pool access is on
the one side stream, so a freed host block is never rewritten before an earlier copy out of it has run.
An fp8 pool (kv_cache_dtype="fp8") is copied through uint8 views of its tensors: the same bytes, and torch
has no index_copy_ for float8 on the CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mini_infer.cpu_threads import step_threads
from mini_infer.kv_transfer.block_copy import gather_blocks, scatter_blocks
from mini_infer.worker.kv_cache import KVCache

logger = logging.getLogger(__name__)


def num_host_blocks(swap_space_gib: float, block_bytes: int) -> int:
    return int(swap_space_gib * 2**30) // block_bytes


def runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first id, length) of each run of consecutive ids."""
    if not ids:
        return []
    a = np.asarray(ids)
    starts = np.flatnonzero(np.diff(a) != 1) + 1
    bounds = np.concatenate(([0], starts, [len(a)]))
    return [(int(s), int(a[s]), int(e - s)) for s, e in zip(bounds[:-1], bounds[1:])]


def _pin_in_place(host: torch.Tensor) -> bool:
    """Page-locks a plain host tensor as it is (cudaHostRegister), so asynchronous copies can use it.
    torch's `pin_memory=True` goes through its caching host allocator, which rounds every allocation up to
    a power of two (24 GiB of swap space would pin 32). False if registering failed."""
    if host.numel() == 0:
        return False
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(host.data_ptr(), host.numel(), 1)) != 0:  # 1: cudaHostRegisterPortable
        logger.warning("cudaHostRegister failed for the swap space; using torch's pinned allocator")
        return False
    if not host.is_pinned():  # copies would run synchronously
        cudart.cudaHostUnregister(host.data_ptr())
        return False
    return True


class KVSwapper:
    """Moves blocks between the device KV pool and a host pool of num_blocks blocks."""

    def __init__(self, kv_cache: KVCache, num_blocks: int) -> None:
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.layout = kv_cache.layout
        cuda = self.device.type == "cuda"
        self.host = torch.empty(num_blocks, self.layout.block_bytes, dtype=torch.uint8)
        self._registered = cuda and _pin_in_place(self.host)
        if cuda and not self._registered:  # torch's pinned allocator: rounds up to a power of two
            self.host = torch.empty(num_blocks, self.layout.block_bytes, dtype=torch.uint8, pin_memory=True)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        logger.info("swap space: %d host blocks (%.2f GiB%s)", num_blocks, self.host.numel() / 2**30, ", pinned" * cuda)

    def __del__(self) -> None:
        if getattr(self, "_registered", False):
            try:
                self.stream.synchronize()  # no copy may still read or write the pages
                torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            except Exception:  # the interpreter is shutting down: the process's end unpins them anyway
                pass

    @property
    def num_blocks(self) -> int:
        return self.host.shape[0]

    def swap(self, blocks_to_swap_out: list[tuple[int, int]], blocks_to_swap_in: list[tuple[int, int]]) -> None:
        """(device block, host block) pairs out, then (host block, device block) pairs in: in this order,
        since a block a swap-out frees may be the one a swap-in of the same step fills. On CPU the copies
        run on one thread: memory-bound, and a second thread waiting at each op's end cost ~6 ms a copy on
        a busy machine against 0.1 ms on one (cpu_threads.py)."""
        with step_threads(self.device, 0):
            if blocks_to_swap_out:
                dev, host = zip(*blocks_to_swap_out)
                self.swap_out(list(dev), list(host))
            if blocks_to_swap_in:
                host, dev = zip(*blocks_to_swap_in)
                self.swap_in(list(host), list(dev))

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.int64)
        return t.pin_memory().to(self.device, non_blocking=True) if self.stream is not None else t

    def swap_out(self, device_blocks: list[int], host_blocks: list[int]) -> None:
        buffer = gather_blocks(self.kv_cache.copy_views, self.layout, self._ids(device_blocks))
        if self.stream is None:
            for pos, first, n in runs(host_blocks):
                self.host[first : first + n].copy_(buffer[pos : pos + n])
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the gather is done
        buffer.record_stream(self.stream)  # not reused by the compute stream before the copy has run
        with torch.cuda.stream(self.stream):
            for pos, first, n in runs(host_blocks):
                self.host[first : first + n].copy_(buffer[pos : pos + n], non_blocking=True)

    def swap_in(self, host_blocks: list[int], device_blocks: list[int]) -> None:
        ids = self._ids(device_blocks)
        if self.stream is None:
            buffer = torch.cat([self.host[first : first + n] for _, first, n in runs(host_blocks)])
        else:
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.stream):
                buffer = torch.empty(len(host_blocks), self.layout.block_bytes, dtype=torch.uint8, device=self.device)
                for pos, first, n in runs(host_blocks):
                    buffer[pos : pos + n].copy_(self.host[first : first + n], non_blocking=True)
            compute.wait_stream(self.stream)  # the compute stream waits for this copy, the host does not
            buffer.record_stream(compute)
        scatter_blocks(self.kv_cache.copy_views, self.layout, ids, buffer)
