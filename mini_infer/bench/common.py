"""What the throughput and latency benchmarks share: engine setup, the model's shape, and the JSON record."""

from __future__ import annotations

import dataclasses
import gc
import json
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used, so `mini-infer --help` need not load it
    import torch

    from mini_infer.bench.roofline import Hardware, ModelShape


def build_engine(args: Any, **overrides: Any) -> Any:
    """An LLMEngine from parsed engine flags (see `mini_infer.config.add_engine_args`) plus overrides."""
    from mini_infer import LLMEngine
    from mini_infer.bench.step_timer import attach_step_timer
    from mini_infer.config import EngineConfig

    settings = {**vars(args), **overrides}
    config = EngineConfig.from_cli_args(_Namespace(settings))
    engine = LLMEngine(config)
    attach_step_timer(engine)
    return engine


class _Namespace:
    """argparse.Namespace stand-in so `EngineConfig.from_cli_args` can read a plain dict."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def shut_down(engine: Any) -> None:
    """Stops an engine's workers if it has any; the caller then drops its last reference."""
    shutdown = getattr(engine, "shutdown", None)
    if callable(shutdown):
        shutdown()


def free_device_memory() -> None:
    """Returns freed GPU memory to the device, so the next backend in this process can size its KV.

    Call it after dropping every reference to the engine or model: memory still referenced stays held.
    """
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine's weights (and KV) are held in."""
    import torch

    model = getattr(getattr(engine, "model_runner", None), "model", None) or getattr(engine, "model", None)
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.dtype
    from mini_infer.model_loader import checkpoint_dtype

    return engine.config.resolve_dtype(checkpoint_dtype(engine.model_config))


def engine_shape(engine: Any) -> tuple[ModelShape, int]:
    """The model's roofline shape and the bytes per weight/KV element."""
    from mini_infer.bench.roofline import ModelShape, dtype_nbytes

    return ModelShape.from_hf_config(engine.model_config), dtype_nbytes(engine_dtype(engine))


def engine_kv_dtype_bytes(engine: Any) -> int:
    """Bytes per element of the engine's KV pool: the model dtype's, or 1 with kv_cache_dtype="fp8"."""
    return engine.model_runner.kv_cache.dtype.itemsize


def load_model_config(model: str, load_format: str = "dummy") -> Any:
    """The HF config of a local dir, hub id or preset, resolved as the engine does. A config needs no weights,
    so by default a preset name resolves too; pass the run's load_format to refuse one as the engine will."""
    from mini_infer.model_loader import load_hf_config, resolve_model_path

    return load_hf_config(resolve_model_path(model, load_format))


def _launcher(program: Path) -> list[str]:
    """`mini-infer` for the console script, `python -m mini_infer.x.y` for a module run with -m."""
    if program.suffix != ".py" or "mini_infer" not in program.parts:
        return [program.name]
    parts = program.with_suffix("").parts
    start = len(parts) - 1 - parts[::-1].index("mini_infer")
    return ["python", "-m", ".".join(parts[start:])]


def environment() -> dict[str, Any]:
    """What a result depends on besides the code: command, GPU, library versions."""
    import torch

    info: dict[str, Any] = {
        "command": shlex.join([*_launcher(Path(sys.argv[0])), *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def hardware_dict(hw: Hardware | None) -> dict[str, float] | None:
    if hw is None:
        return None
    return {"hbm_gb_per_s": hw.hbm_bytes_per_s / 1e9, "bf16_peak_tflops": hw.peak_flops / 1e12}


RESULTS_DIR = "bench-results"


def default_result_path(benchmark: str, model: str, result_dir: str | None = None) -> str:
    """Where a run writes its record when not told: RESULT_DIR/BENCHMARK-MODEL-YYYYmmdd-HHMMSS.json."""
    name = Path(model.rstrip("/")).name or "model"
    return str(Path(result_dir or RESULTS_DIR) / f"{benchmark}-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def write_json(path: str | None, record: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


def mean_step_timings(timings: Any) -> dict[str, float | None]:
    """Mean host and GPU milliseconds per step from StepTimer records (bench/step_timer.py).

    A record is a (host_seconds, gpu_seconds or None) pair, or an object with those two attributes.
    """
    host, gpu = [], []
    for t in timings:
        pair = (
            (t[0], t[1] if len(t) > 1 else None)
            if isinstance(t, (tuple, list))
            else (getattr(t, "host_seconds", None), getattr(t, "gpu_seconds", None))
        )
        if pair[0] is not None:
            host.append(pair[0])
        if pair[1] is not None:
            gpu.append(pair[1])
    result: dict[str, float | None] = {
        "mean_step_host_ms": 1e3 * sum(host) / len(host) if host else None,
        "mean_step_gpu_ms": 1e3 * sum(gpu) / len(gpu) if gpu else None,
    }
    # where the engine says what each step ran: the steps with prefill tokens apart (host and GPU
    # seconds are summed separately: with async scheduling they overlap)
    with_prefill = [t for t in timings if getattr(t, "num_prefill_tokens", 0)]
    if with_prefill:
        result["prefill_steps"] = len(with_prefill)
        result["prefill_steps_host_seconds"] = sum(t.host_seconds for t in with_prefill)
        result["prefill_steps_gpu_seconds"] = sum(t.gpu_seconds or 0.0 for t in with_prefill)
    return result


def step_log(timings: Any) -> list[list[float | int | None]]:
    """Per step [host ms, GPU ms, decodes, prefill tokens], from StepTimer records."""
    return [
        [
            round(1e3 * t.host_seconds, 4),
            None if t.gpu_seconds is None else round(1e3 * t.gpu_seconds, 4),
            t.num_decodes,
            t.num_prefill_tokens,
        ]
        for t in timings
    ]


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@contextmanager
def gc_pauses() -> Iterator[dict[str, float | int]]:
    """Python garbage collections while the block runs: how many, and the longest and total pause. A full
    collection over a large heap stalls the host for a fraction of a second, which the GPU then waits out."""
    summary: dict[str, float | int] = {"collections": 0, "full_collections": 0, "total_ms": 0.0, "max_ms": 0.0}
    started: list[float] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            ms = 1e3 * (time.perf_counter() - started.pop())
            summary["collections"] += 1
            summary["full_collections"] += info.get("generation") == 2
            summary["total_ms"] += ms
            summary["max_ms"] = max(summary["max_ms"], ms)

    gc.callbacks.append(callback)
    try:
        yield summary
    finally:
        gc.callbacks.remove(callback)


@contextmanager
def triton_compiles() -> Iterator[list[str]]:
    """Collects the name of each Triton kernel variant compiled (or loaded from Triton's disk cache) while
    the block runs. A compile inside a timed run stalls it for a fraction of a second, so the benchmarks
    report these; the list stays empty where Triton has no compile hook (before 3.4, or interpreted)."""
    names: list[str] = []
    try:
        from triton import knobs

        runtime = knobs.runtime
        previous = runtime.jit_post_compile_hook
    except (ImportError, AttributeError):
        yield names
        return

    def hook(**kwargs: Any) -> Any:
        names.append(str(getattr(kwargs.get("fn"), "name", "?")))
        return previous(**kwargs) if previous is not None else None

    runtime.jit_post_compile_hook = hook
    try:
        yield names
    finally:
        runtime.jit_post_compile_hook = previous


@dataclass
class RunResult:
    """One backend on one workload."""

    backend: str
    num_requests: int
    wall_seconds: float
    prompt_tokens: int
    output_tokens: int
    ideal_seconds: float | None = None
    kv_slot_utilisation: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    steps: list[list[Any]] | None = field(default=None, repr=False)  # per-step log, kept out of to_dict

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.wall_seconds

    @property
    def total_tok_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_seconds

    @property
    def roofline_fraction(self) -> float | None:
        return None if self.ideal_seconds is None else self.ideal_seconds / self.wall_seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "steps"},
            "output_tok_per_s": self.output_tok_per_s,
            "total_tok_per_s": self.total_tok_per_s,
            "roofline_fraction": self.roofline_fraction,
        }
