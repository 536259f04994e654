"""How many threads a CPU step's torch ops get: one for small steps, torch's default for large ones.

A decode step of a small model is thousands of tiny ops, and each op that torch or MKL splits across
threads waits for every thread at its end. On an idle 2-core machine that wait costs a few
microseconds; on a busy one (CI, a laptop running anything else) the other thread is often off the
core, and one [16, 64] x [64, 192] matmul took 8 ms with two threads against 11 us with one
(benchmarks/results/cpu/threads_*.txt). So a step whose matmul work is below `SMALL_STEP_MACS` runs
single-threaded, and larger ones keep the process's setting (`torch.set_num_threads`), where splitting
the GEMMs pays. The thread count changes no result: each output element is the same dot product.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Multiply-accumulates of a step's linear layers (tokens x weights) below which one thread is faster:
# measured with benchmarks/results/cpu/threads_*.txt's F.linear sweep, 1 vs 2 threads.
SMALL_STEP_MACS = 64 * 2**20


@contextmanager
def step_threads(device: torch.device, macs: int) -> Iterator[None]:
    """Runs the block single-threaded when it is a CPU step of fewer than SMALL_STEP_MACS multiply-adds."""
    if device.type != "cpu" or macs >= SMALL_STEP_MACS or (threads := torch.get_num_threads()) == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
