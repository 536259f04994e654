"""The one timer of the scripts here: GPU work replayed from a CUDA graph, as the engine runs it.

Python's launch overhead would swamp the microsecond kernels measured here, and the engine replays
graphs anyway. The work is warmed up on a side stream (compiles, autotuning, the allocator), then
captured `calls` times back to back in one graph; each replay is timed with CUDA events, and the
median replay over `reps`, divided by `calls`, is the time per call, the launch gaps inside a graph
included. Nothing flushes the L2 cache between replays: a script that needs cold data rotates over
buffers larger than the L2 (sampling_sweep.py) or gives every call its own weights (gemm_floor.py).

The copy bandwidth that results are set against is the roofline's own probe,
`mini_infer.bench.roofline.measure_hbm_bandwidth`, so every figure here shares one denominator.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

WARMUP_REPLAYS = 3


def capture(fn: Callable[[int], Any], calls: int) -> tuple[torch.cuda.CUDAGraph, list[Any]]:
    """A graph of fn(0), ..., fn(calls - 1), and what those calls returned (tensors each replay refills)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(i) for i in range(calls)]
    return graph, outs


def replay_us(graph: torch.cuda.CUDAGraph, calls: int, reps: int = 20) -> float:
    """Microseconds per call: the median of `reps` timed replays of a graph holding `calls` calls."""
    for _ in range(WARMUP_REPLAYS):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3 / calls


def graph_us(fn: Callable[[], Any], calls: int = 20, reps: int = 20) -> float:
    """Microseconds per call of fn, replayed from a CUDA graph of `calls` back-to-back calls."""
    graph, _ = capture(lambda _i: fn(), calls)
    return replay_us(graph, calls, reps)


def rotation_us(fn_i: Callable[[int], Any], copies: int) -> float:
    """Microseconds per call of fn_i(i) over a rotation of `copies` weight copies (i = call index mod
    copies, so consecutive calls read other weights, as consecutive layers do): graph replay on CUDA, a
    plain loop of two calls on a CPU (the scripts' smoke runs)."""
    if torch.cuda.is_available():
        calls = max(copies, 8)
        graph, _ = capture(lambda i: fn_i(i % copies), calls)
        us = replay_us(graph, calls, reps=10)
        del graph
        return us
    fn_i(0)
    start = time.perf_counter()
    for i in range(2):
        fn_i(i % copies)
    return (time.perf_counter() - start) / 2 * 1e6
