"""How many threads a CPU step's torch ops get: one for small steps, torch's default for large ones.

A decode step of a small model is thousands of tiny ops, and each op that torch or MKL splits across
threads waits for every thread at its end. On an idle 2-core machine that wait costs a few
microseconds; on a busy one (CI, a laptop running anything else) the other thread is often off the
core, and one [16, 64] x [64, 192] matmul took 8 ms with two threads against 11 us with one. Idle, two
threads gained at most 25%, and only on GEMMs of 50M+ multiply-adds (benchmarks/results/cpu/threads.txt).
So a step whose matmul work is below `SMALL_STEP_MACS` runs single-threaded (every step of stories260K,
its 1024-token prefills included, and a 0.6B model's batch-1 decode, whose GEMVs were faster on one
thread even idle), and larger ones keep the process's setting (`torch.set_num_threads`). The thread count
changes no result here: the tests compare the tokens of both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Multiply-adds of a step (tokens x weights) below which it runs on one thread (threads.txt).
SMALL_STEP_MACS = 2**30


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
