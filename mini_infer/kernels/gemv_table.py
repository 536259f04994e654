"""Which kernel a few-row linear takes on this GPU, and with which tile: measured, per shape.

Decode at batch 1-8 is a chain of weight-bound products whose best kernel differs by GPU and shape
(on an H100 the plain GEMV beat cuBLAS on 4 of Llama-3-8B's 5 projections; on an H200 cuBLAS won). So
the choice lives in gemv_configs.json, written by benchmarks/gemv_sweep.py from timings inside CUDA
graphs over weights that do not fit in L2, as a decode step sees them:

    {"configs": {GPU name: {weight dtype: {rows: {"NxK": {"kernel": ..., tile fields}}}}}}

kernel is "cublas" (F.linear; 8-bit: activation quant + torch._scaled_mm / _int_mm), "gemv" (the plain
GEMV, kernels/gemv.py; 8-bit: the fused quantizing GEMV, kernels/scaled_mm.py), or "skinny" (the
tensor-core kernel, kernels/skinny_mm.py; 8-bit: after the activation-quant kernel). A batch of m rows takes the
entry of the smallest listed row count >= m; a shape or GPU the file does not list gets None, and the
caller its own default. The choice depends on shapes only, so a CUDA graph always replays the kernel it
was captured with.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

TABLE_FILE = Path(__file__).with_name("gemv_configs.json")
KERNELS = ("cublas", "gemv", "skinny")


@dataclass(frozen=True)
class GemvChoice:
    kernel: str
    tile: dict[str, int] = field(default_factory=dict)  # the kernel's config fields


def dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _load(path: Path = TABLE_FILE) -> dict:
    return json.loads(path.read_text())["configs"] if path.exists() else {}


def parse_choice(entry: dict) -> GemvChoice:
    kernel = entry["kernel"]
    if kernel not in KERNELS:
        raise ValueError(f"gemv table: unknown kernel {kernel!r} (one of {', '.join(KERNELS)})")
    return GemvChoice(kernel, {k: int(v) for k, v in entry.items() if k != "kernel"})


def lookup(table: dict, device_name: str, dtype: torch.dtype, rows: int, n: int, k: int) -> GemvChoice | None:
    by_rows = table.get(device_name, {}).get(dtype_key(dtype), {})
    for listed in sorted(by_rows, key=int):
        if int(listed) >= rows:
            entry = by_rows[listed].get(f"{n}x{k}")
            return parse_choice(entry) if entry is not None else None
    return None


@functools.lru_cache(maxsize=4096)  # every eager linear call asks
def tuned_choice(device: torch.device, dtype: torch.dtype, rows: int, n: int, k: int) -> GemvChoice | None:
    """The measured choice for this GPU and shape, or None (off CUDA, or not measured)."""
    if device.type != "cuda":
        return None
    return lookup(_load(), torch.cuda.get_device_name(device), dtype, rows, n, k)
