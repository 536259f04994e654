"""Optional Triton import shared by the kernel files.

The PyTorch references sit in the same files as the Triton kernels and must keep working where
Triton is not installed (CPU-only wheels, macOS). Without Triton, `triton.jit`
becomes a no-op decorator and `tl.constexpr` a plain annotation, so the kernel definitions still
parse; calling a Triton wrapper then raises a clear error.

Without a CUDA device this module switches on `TRITON_INTERPRET=1` (unless set) before importing
Triton, so the kernels run on CPU tensors in Triton's interpreter whatever imports mini_infer first.
The interpreter has two traps. It multiplies the raw bit patterns in a bfloat16 `tl.dot`
(triton-lang/triton#11584), so the attention kernels take an `UPCAST_DOT` flag that casts dot
operands to float32 there; products of bfloat16 values are exact in float32 and the GPU accumulates
in float32 too, so the flag changes no result beyond summation order. And it truncates float32 to
bfloat16 where the GPU rounds to nearest even: one unit in the last place, on the CPU only.
"""

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # Triton compiles for GPUs only; without one its kernels can still run in its interpreter, and that
    # choice must be made before triton is first imported (tests, kernel_backend="triton" on a CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the torch backend runs without Triton
    HAS_TRITON = False

    class _ConstexprStub:
        """Stands in for tl.constexpr in kernel signatures when Triton is missing."""

    class _TritonLanguageStub:
        constexpr = _ConstexprStub

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _TritonLanguageStub()  # type: ignore[assignment]


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("kernel_backend='triton' needs Triton: pip install 'mini-infer[triton]'")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def upcast_dot(t: torch.Tensor) -> bool:
    """True where tl.dot must see float32 operands: the CPU interpreter with bfloat16 data."""
    return t.device.type == "cpu"


@triton.jit
def dot(a, b, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation; see the module docstring for UPCAST_DOT."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs (tf32 would cost ~3e-4 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); a small stand-in on CPU."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


__all__ = [
    "HAS_TRITON",
    "dot",
    "dot_precision",
    "next_pow2",
    "num_sms",
    "require_triton",
    "tl",
    "triton",
    "upcast_dot",
]
