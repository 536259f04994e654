"""Programmatic dependent launch (Hopper and later): a kernel's launch overlaps the end of the one before it.

Inside a CUDA graph the kernels of a decode step still run strictly one after another, and each pays its
launch after the grid before it has finished. With PDL a kernel is launched early (`launch_pdl=True`): its
programs become resident while the previous grid drains and wait in `gdc_wait` until that grid has
finished and its writes are visible. Nothing is read or written before the wait. After it, a kernel lets
the next one launch (`gdc_launch_dependents`).

Ordering stays what it was: every kernel launched with PDL waits before its first read and first write,
and a grid finishes only after its own wait, so the guarantee holds through any chain; kernels launched
without PDL (torch ops, cuBLAS, memcpy nodes) wait for their predecessor as always. The kernels compute
the same bits either way (tests/test_pdl.py).

Which kernels take it is measured (Llama-3-8B decode on an H200, benchmarks/results/h200/session7/): the
few-row products gain 1.6-2.4% a step at batch 1-16 (b1 4.416 vs 4.511 ms, b16 4.752 vs 4.831); PDL on the
norms, RoPE + KV store, decode attention and SiLU-and-mul as well is 0.6% faster still at batch 1 but 3-6%
slower at batch 16 than the products alone; triggering the next launch before the wait, and the products
pulling their first weight columns into L2 before it, were slower at every batch size. So DEFAULT_KERNELS
is the products alone. Qwen3-0.6B's 256-request throughput does not change either way.

`MINI_INFER_PDL`: "0" off; "1" (the default where supported: CUDA compute capability 9 or more, a Triton
with `gdc_wait`) the kernels of DEFAULT_KERNELS; or a comma-separated list of names from KERNELS, for A/B
runs.
"""

import functools
import os

import torch

from mini_infer.kernels._triton import HAS_TRITON, tl, triton

PDL_ENV = "MINI_INFER_PDL"
KERNELS = ("norm", "rotary", "attention", "silu", "skinny")
DEFAULT_KERNELS = ("skinny",)


def _triton_has_gdc() -> bool:
    if not HAS_TRITON:
        return False
    try:
        from triton.language.extra import cuda as tl_cuda
    except ImportError:
        return False
    return hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")


@functools.cache
def pdl_supported(device_index: int) -> bool:
    """An NVIDIA GPU of compute capability 9+ (griddepcontrol) and a Triton that exposes it; never under the
    interpreter, nor on ROCm (whose capability numbers are not NVIDIA's)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.version.hip is not None or not _triton_has_gdc():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _kernels_from_env() -> frozenset[str]:
    value = os.environ.get(PDL_ENV, "1").strip()
    if value == "0":
        return frozenset()
    if value == "1":
        return frozenset(DEFAULT_KERNELS)
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    if unknown := names - set(KERNELS):
        raise ValueError(f"{PDL_ENV}: unknown kernels {sorted(unknown)}; known: {', '.join(KERNELS)}")
    return names


@functools.cache
def _launch_options(device_index: int) -> dict[str, dict]:
    """Per kernel name, its launch keywords on this device (read once per device and process)."""
    kernels = _kernels_from_env() if pdl_supported(device_index) else frozenset()
    return {name: {"USE_PDL": True, "launch_pdl": True} if name in kernels else {"USE_PDL": False} for name in KERNELS}


def pdl_launch(t: torch.Tensor, kernel: str) -> dict:
    """The launch keywords of `kernel` (a name in KERNELS, whose Triton function takes a `USE_PDL:
    tl.constexpr`) working on `t`'s device: PDL on, or off."""
    if not t.is_cuda:
        return {"USE_PDL": False}
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _launch_options(index)[kernel]


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the previous grid, then let the next kernel launch; nothing without PDL."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


__all__ = ["KERNELS", "pdl_launch", "pdl_supported", "pdl_wait"]
