"""The 8-bit kernels (activation quantization, W8A8 GEMV) against their PyTorch references, under
Triton's interpreter on CPU. Activation quantization is bit-exact; the products agree up to float32
summation order."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels.act_quant import act_quant_ref, act_quant_triton  # noqa: E402
from mini_infer.kernels.scaled_mm import w8a8_gemv_triton, w8a8_mm, w8a8_mm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float8_e4m3fn, torch.int8]


def _inputs(m: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g) * 3
    if m > 2:
        x[1] = 0  # a zero row: tiny scale, zero values
        x[2, :4] = torch.tensor([0.5, 1.5, 2.5, -2.5]) * x[2].abs().max() / 127 * 2  # int8 ties
        x[2, 4] = x[2].abs().max() * 1.0001  # the row's amax
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_reference_exactly(dtype, group, in_dtype):
    x = _inputs(6, 160 if group is None else 96, in_dtype)
    q, s = act_quant_triton(x, dtype, group)
    q_ref, s_ref = act_quant_ref(x, dtype, group)
    assert q.dtype == dtype and s.dtype == torch.float32
    assert s.shape == (6, 1 if group is None else 3)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.float(), q_ref.float())
    assert torch.all(q[1].float() == 0)


def test_act_quant_rounding_rules():
    """int8 rounds half to even and clamps to +-127; fp8 saturates at 448 (e4m3fn has no infinity)."""
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -127.0, 63.5]], device=DEVICE)
    q, s = act_quant_triton(x, torch.int8)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, -2, -127, 64]]
    q8, _ = act_quant_triton(x, torch.float8_e4m3fn)
    assert q8.float().abs().max().item() == 448.0


def test_act_quant_rejects_partial_groups():
    with pytest.raises(ValueError, match="groups of 48"):
        act_quant_ref(torch.zeros(2, 64), torch.int8, 48)
    with pytest.raises(ValueError, match="float8_e4m3fn or int8"):
        act_quant_ref(torch.zeros(2, 64), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 96), (3, 80), (11, 96)])
def test_w8a8_gemv_channel_scales(dtype, m, k):
    x, w = _inputs(m, k), _inputs(40, k) / 10
    bias = torch.randn(40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    xq, sx = act_quant_ref(x, dtype)
    wq, sw = act_quant_ref(w, dtype)
    ref = w8a8_mm_ref(xq, sx, wq, sw, bias, torch.float32)
    out = w8a8_gemv_triton(xq, sx, wq, sw, bias, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(w8a8_mm(xq, sx, wq, sw, bias, torch.float32), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 5])
def test_w8a8_gemv_block_scales(m):
    """Block FP8: the weight scale per 8 x 32 block, activations per token and 32-column group."""
    x, w = _inputs(m, 128), _inputs(40, 128)
    xq, sx = act_quant_ref(x, torch.float8_e4m3fn, 32)
    wq, _ = act_quant_ref(w, torch.float8_e4m3fn)
    sw = (torch.rand(5, 4, generator=torch.Generator().manual_seed(2)) + 0.1).to(DEVICE)
    ref = w8a8_mm_ref(xq, sx, wq, sw, None, torch.float32, (8, 32))
    out = w8a8_gemv_triton(xq, sx, wq, sw, None, torch.float32, (8, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, (8, 32)])
@pytest.mark.parametrize("m", [1, 6])
def test_w8a8_gemv_quantizes_activations_in_kernel(dtype, block, m):
    """x in the model dtype, quantized inside the GEMV (decode's one-launch linear): the same as
    act_quant_ref followed by the reference product."""
    x, w = _inputs(m, 128), _inputs(40, 128) / 10
    wq, sw = act_quant_ref(w, dtype)
    if block is not None:
        sw = (torch.rand(5, 4, generator=torch.Generator().manual_seed(3)) + 0.1).to(DEVICE)
    xq, sx = act_quant_ref(x, dtype, None if block is None else block[1])
    ref = w8a8_mm_ref(xq, sx, wq, sw, None, torch.float32, block)
    out = w8a8_gemv_triton(x, None, wq, sw, None, torch.float32, block)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
