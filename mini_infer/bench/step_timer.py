"""StepTimer: the engine's step loop timed from outside, for the benchmarks (engine.observer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class StepTiming:
    """One step: the host seconds of the step() call that queued it, less its waits for the GPU; the
    CUDA-event seconds of its queued forward pass and sampling, set when its tokens are read back (None
    on CPU or until then; it includes any wait for the host to launch the work); and what it queued."""

    host_seconds: float
    gpu_seconds: float | None
    num_decodes: int
    num_prefill_tokens: int


class StepTimer:
    """A StepObserver that keeps a StepTiming per step that ran a batch (the newest million)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.timings: list[StepTiming] = []
        self._current: StepTiming | None = None
        self._start: Any = None  # torch.cuda.Event (torch is imported where used: `mini-infer --help` stays fast)
        self._gpu: dict[int, tuple[StepTiming, Any, Any]] = {}

    def launching(self, out: Any) -> None:
        if self.cuda:
            import torch

            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def launched(self, out: Any, pending: Any) -> None:
        self._current = StepTiming(0.0, None, len(out.decodes), sum(s.num_new_tokens for s in out.prefills))
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._gpu[id(pending)] = (self._current, self._start, end)

    def step_done(self, seconds: float, read: list[Any]) -> None:
        for pending in read:
            timing, start, end = self._gpu.pop(id(pending), (None, None, None))
            if timing is not None:
                end.synchronize()
                timing.gpu_seconds = start.elapsed_time(end) / 1e3
        if self._current is not None:
            self._current.host_seconds = seconds - sum(p.waited for p in read)
            self.timings.append(self._current)
            self._current = None
        if len(self.timings) > 1_000_000:
            del self.timings[:500_000]


def attach_step_timer(engine: Any) -> StepTimer:
    timer = StepTimer(engine.model_runner.device.type == "cuda")
    engine.observer = timer
    return timer


def step_timings(engine: Any) -> list[StepTiming] | None:
    """The timings of an engine with a StepTimer attached (None for other backends)."""
    observer = getattr(engine, "observer", None)
    return observer.timings if isinstance(observer, StepTimer) else None
