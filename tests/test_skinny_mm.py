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
from mini_infer.kernels.activation import silu_and_mul_ref  # noqa: E402
from mini_infer.kernels.gemv_table import GemvChoice, lookup, parse_choice  # noqa: E402
from mini_infer.kernels.rmsnorm import fused_add_rms_norm_ref, rms_norm_ref  # noqa: E402
from mini_infer.kernels.scaled_mm import w8a8_mm_ref  # noqa: E402
from mini_infer.kernels.skinny_mm import SkinnyConfig, skinny_mm, skinny_mm_fused  # noqa: E402

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
    with pytest.raises(ValueError, match="8-bit weights need w_scale"):
        skinny_mm_fused(_randn(1, 32), act_quant_ref(_randn(8, 32), torch.int8)[0])


@pytest.mark.parametrize("m,k", [(1, 96), (3, 50)])
@pytest.mark.parametrize("residual", [False, True])
def test_skinny_mm_fused_norm_is_the_norm_then_the_product(m, k, residual):
    """add + RMSNorm in the prologue: the same rounding steps as kernels/rmsnorm.py (its sum of squares
    in another order), and the residual sum returned as a new tensor, the old one left alone."""
    x, r, g = _randn(m, k), _randn(m, k, seed=3), _randn(k, seed=4)
    w = _randn(40, k, seed=1) / k**0.5
    r_before = r.clone()
    if residual:
        normed = fused_add_rms_norm_ref(x, r.clone(), g, 1e-5)
    else:
        normed = rms_norm_ref(x, g, 1e-5)
    y, r_out = skinny_mm_fused(x, w, residual=r if residual else None, norm=(g, 1e-5))
    torch.testing.assert_close(y, torch.nn.functional.linear(normed, w), atol=2e-5, rtol=2e-5)
    assert torch.equal(r, r_before)
    if residual:
        assert torch.equal(r_out, r_before + x)
    else:
        assert r_out is None


def test_skinny_mm_fused_silu_is_silu_and_mul_then_the_product():
    gate_up, w = _randn(2, 2 * 80), _randn(24, 80, seed=1) / 80**0.5
    y, _ = skinny_mm_fused(gate_up, w, silu=True)
    torch.testing.assert_close(y, torch.nn.functional.linear(silu_and_mul_ref(gate_up), w), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("prologue", ["none", "norm", "silu"])
def test_skinny_mm_fused_quantizes_its_input_per_token(dtype, prologue):
    """8-bit weights: the prologue's output quantized as act_quant_ref does (the same amax, so the same
    scale and 8-bit values), times the weights as w8a8_mm_ref does."""
    m, k = 3, 64
    x, g = _randn(m, 2 * k if prologue == "silu" else k) * 3, _randn(k, seed=4)
    wq, sw = act_quant_ref(_randn(40, k, seed=1), dtype)
    inputs = {"none": lambda: x, "norm": lambda: rms_norm_ref(x, g, 1e-5), "silu": lambda: silu_and_mul_ref(x)}
    xq, sx = act_quant_ref(inputs[prologue](), dtype)
    ref = w8a8_mm_ref(xq, sx, wq, sw, None, torch.float32)
    norm = (g, 1e-5) if prologue == "norm" else None
    y, _ = skinny_mm_fused(x, wq, w_scale=sw, norm=norm, silu=prologue == "silu")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


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
    assert skinny == GemvChoice("skinny", (("block_k", 64), ("block_n", 32), ("num_stages", 3), ("num_warps", 4)))
    assert SkinnyConfig(**skinny.config()) == SkinnyConfig(32, 64, 4, 3)
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
                        SkinnyConfig(**choice.config())
    assert gemv_table.tuned_choice(torch.device("cpu"), torch.bfloat16, 1, 64, 32) is None
