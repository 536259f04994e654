"""The few-row tensor-core kernel against its references (Triton's interpreter on CPU), and the measured
dispatch table that picks it: lookups by GPU, dtype, row bucket and shape, and its file's format."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels import gemv_table  # noqa: E402
from mini_infer.kernels.act_quant import act_quant_ref  # noqa: E402
from mini_infer.kernels.gemv_table import GemvChoice, lookup, parse_choice  # noqa: E402
from mini_infer.kernels.scaled_mm import w8a8_mm_ref  # noqa: E402
from mini_infer.kernels.skinny_mm import SkinnyConfig, skinny_mm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (3, 64, 128), (16, 17, 50)])  # ragged N and K tails
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_mm_model_dtype(m, n, k, bias):
    x, w = _randn(m, k), _randn(n, k, seed=1) / k**0.5
    b = _randn(n, seed=2) if bias else None
    ref = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(skinny_mm(x, w, b), ref, atol=2e-5, rtol=2e-5)
    xb, wb = x.bfloat16(), w.bfloat16()  # one rounding of the float32 sum: a unit or two in the last place
    ref_b = torch.nn.functional.linear(xb.float(), wb.float(), None if b is None else b.bfloat16().float())
    torch.testing.assert_close(
        skinny_mm(xb, wb, None if b is None else b.bfloat16()).float(), ref_b, atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (5, 33, 64)])
def test_skinny_mm_w8a8_channel_scales(dtype, m, n, k):
    """The same arithmetic as w8a8_mm_ref (8-bit products summed, then both scales), up to summation
    order; int8 sums in int32, exactly."""
    xq, sx = act_quant_ref(_randn(m, k) * 3, dtype)
    wq, sw = act_quant_ref(_randn(n, k, seed=1), dtype)
    b = _randn(n, seed=2)
    ref = w8a8_mm_ref(xq, sx, wq, sw, b, torch.float32)
    out = skinny_mm(xq, wq, b, sx, sw, torch.float32, SkinnyConfig(block_n=16, block_k=32, num_warps=1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_skinny_mm_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny_mm(_randn(17, 32), _randn(8, 32))
    with pytest.raises(ValueError, match="both scales"):
        skinny_mm(_randn(1, 32), _randn(8, 32), x_scale=torch.ones(1, 1, device=DEVICE))


TABLE = {
    "GPU X": {
        "bfloat16": {
            "1": {"64x32": {"kernel": "skinny", "block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 3}},
            "4": {"64x32": {"kernel": "cublas"}},
        }
    }
}


def test_table_lookup_takes_the_smallest_listed_row_count_at_or_above():
    skinny = lookup(TABLE, "GPU X", torch.bfloat16, 1, 64, 32)
    assert skinny == GemvChoice("skinny", {"block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 3})
    assert SkinnyConfig(**skinny.tile) == SkinnyConfig(32, 64, 4, 3)
    assert lookup(TABLE, "GPU X", torch.bfloat16, 2, 64, 32).kernel == "cublas"  # bucket 4
    assert lookup(TABLE, "GPU X", torch.bfloat16, 5, 64, 32) is None  # past the largest bucket
    assert lookup(TABLE, "GPU X", torch.bfloat16, 1, 64, 64) is None  # shape not measured
    assert lookup(TABLE, "GPU Y", torch.bfloat16, 1, 64, 32) is None  # GPU not measured
    assert lookup(TABLE, "GPU X", torch.int8, 1, 64, 32) is None
    with pytest.raises(ValueError, match="unknown kernel"):
        parse_choice({"kernel": "magic"})


def test_shipped_table_parses_and_is_ignored_off_cuda():
    """Every entry of the shipped file names a known kernel with its tile fields; off CUDA nothing is
    looked up (the interpreter takes the kernels' own small tiles)."""
    for by_dtype in gemv_table._load().values():
        for by_rows in by_dtype.values():
            for by_shape in by_rows.values():
                for entry in by_shape.values():
                    choice = parse_choice(entry)
                    if choice.kernel == "skinny":
                        SkinnyConfig(**choice.tile)
    assert gemv_table.tuned_choice(torch.device("cpu"), torch.bfloat16, 1, 64, 32) is None
