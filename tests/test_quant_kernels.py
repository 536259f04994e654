"""The 8-bit kernels (activation quantization, W8A8 GEMV, RMSNorm / add+RMSNorm / SiLU-and-mul with their
output quantized) against their PyTorch references, under Triton's interpreter on CPU; on a CUDA machine
the same tests run compiled. Activation quantization is bit-exact; the products agree up to float32
summation order."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels.act_quant import (  # noqa: E402
    QuantizedActivation,
    act_quant_ref,
    act_quant_triton,
    quantize_activation,
)
from mini_infer.kernels.activation import (  # noqa: E402
    silu_and_mul_quant_ref,
    silu_and_mul_quant_triton,
    silu_and_mul_triton,
)
from mini_infer.kernels.rmsnorm import (  # noqa: E402
    fused_add_rms_norm_quant_ref,
    fused_add_rms_norm_quant_triton,
    fused_add_rms_norm_triton,
    rms_norm_quant_ref,
    rms_norm_quant_triton,
    rms_norm_triton,
)
from mini_infer.kernels.scaled_mm import (  # noqa: E402
    _has_fp8_mm,
    _scaled_mm_fp8,
    fp8_rowwise_writes,
    w8a8_gemv_triton,
    w8a8_linear,
    w8a8_linear_quantized,
    w8a8_mm,
    w8a8_mm_ref,
)

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


def test_fp8_rowwise_writes_dispatch():
    """The out dtypes torch._scaled_mm writes itself under row-wise scales: bfloat16 everywhere, float16 /
    float32 only on cuBLASLt's row-wise path (sm 9.x, CUDA >= 12.9); the rest take the float32 path."""
    for capability in [(8, 9), (9, 0), (10, 0), (12, 0)]:
        assert fp8_rowwise_writes(torch.bfloat16, capability, "12.4")
    for out_dtype in [torch.float16, torch.float32]:
        assert fp8_rowwise_writes(out_dtype, (9, 0), "13.0")
        assert fp8_rowwise_writes(out_dtype, (9, 0), "12.9")
        assert fp8_rowwise_writes(out_dtype, (9, 0), "12.10")
        assert not fp8_rowwise_writes(out_dtype, (9, 0), "12.8")
        assert not fp8_rowwise_writes(out_dtype, (9, 0), None)
        assert not fp8_rowwise_writes(out_dtype, (8, 9), "13.0")
        assert not fp8_rowwise_writes(out_dtype, (10, 0), "13.0")
    assert not fp8_rowwise_writes(torch.float8_e4m3fn, (9, 0), "13.0")


@pytest.mark.skipif(
    torch.cuda.is_available() and not _has_fp8_mm(torch.device("cuda")), reason="torch._scaled_mm needs sm89+"
)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [3, 40])
@pytest.mark.parametrize("rowwise", [None, False], ids=["device_choice", "float32_path"])
def test_scaled_mm_fp8_writes_the_model_dtype(out_dtype, m, rowwise):
    """torch._scaled_mm's fp8 product (on CPU torch's own _scaled_mm, which writes any float dtype; on CUDA
    cuBLASLt / CUTLASS) in out_dtype against the float32 reference: a float32 model gets float32 accuracy,
    not a bfloat16 result cast up."""
    x, w = _inputs(m, 96), _inputs(48, 96) / 10
    xq, sx = act_quant_ref(x, torch.float8_e4m3fn)
    wq, sw = act_quant_ref(w, torch.float8_e4m3fn)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(6)).to(out_dtype).to(DEVICE)
    ref = w8a8_mm_ref(xq, sx, wq, sw, bias, torch.float32)
    out = _scaled_mm_fp8(xq, sx, wq, sw, bias, out_dtype, rowwise)
    assert out.dtype == out_dtype and out.shape == (m, 48)
    # Hopper's fp8 tensor cores add their products at less than float32 precision (~2e-4 of the largest
    # output here, measured on the H200), so on CUDA float32 is held to 1e-3, and to beating a bfloat16
    # result: the error of the reference rounded to bfloat16, which is what the old cast-up gave at best
    rel = {torch.float32: 1e-3 if out.is_cuda else 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    torch.testing.assert_close(out.float(), ref, rtol=rel[out_dtype], atol=rel[out_dtype] * ref.abs().max().item())
    if out_dtype == torch.float32:
        assert (out - ref).abs().max() < (ref.bfloat16().float() - ref).abs().max()


# -- the norms and SiLU-and-mul with their output quantized (quantization/fused_act_quant.py) -----------
def assert_same_bits(out: QuantizedActivation, expected: QuantizedActivation) -> None:
    assert out.values.dtype == expected.values.dtype and out.scales.dtype == torch.float32
    assert out.dtype == expected.dtype
    assert out.values.shape == expected.values.shape and out.scales.shape == expected.scales.shape
    assert torch.equal(out.scales, expected.scales)
    assert torch.equal(out.values.float(), expected.values.float())


def assert_one_step_from(out: QuantizedActivation, oracle: QuantizedActivation) -> None:
    """Dequantized, within one 8-bit step of the torch oracle's, plus what the unquantized outputs may differ
    by. Each rounds within half a step of its op's output; the Triton op's output may miss torch's by a few
    ulps (sum order, sigmoid; the interpreter truncates to bfloat16 where torch rounds, at each of the
    norm's roundings): the relative tolerance test_kernels.py gives those ops, on every value and, through
    the row's amax, on the scale. int8's step is the scale; e4m3's an ulp of 3 mantissa bits (2**-9 of the
    scale below 2**-6)."""
    deq, deq_ref = out.values.float() * out.scales, oracle.values.float() * oracle.scales
    ulp = 2e-2 if oracle.dtype == torch.bfloat16 else 2e-5  # test_kernels.py's TOLERANCE
    if out.values.dtype == torch.int8:
        step = oracle.scales * 1.01
    else:
        step = torch.maximum(deq.abs(), deq_ref.abs()) * 2**-3 + oracle.scales * 2**-9
    assert torch.all((deq - deq_ref).abs() <= step + deq_ref.abs() * ulp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 96), (5, 96), (6, 200)])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_rms_norm_quant(dtype, in_dtype, rows, hidden, residual):
    """Bit-equal to act_quant_ref of the unfused Triton norm's output: the fused kernel runs that kernel's
    float32 steps (_norm_row), rounds to the output dtype as its store would, then act_quant's shared steps
    (quant_scale, quantize_values), which give act_quant_ref's bits (test_act_quant_matches_reference_exactly).
    The residual is updated in its own dtype, bit-equal to the unfused kernel's. Hidden 96 and 200: not
    powers of two (masked lanes in the row's block); a zero row (x and residual) gets the tiny scale."""
    x, weight = _inputs(rows, hidden, in_dtype), (_inputs(1, hidden)[0] / 3).to(in_dtype)
    if residual:
        res = _inputs(rows, hidden, in_dtype).flip(0) / 2
        if rows > 1:
            res[1] = 0
        res_fused, res_unfused, res_ref = res.clone(), res.clone(), res.clone()
        out = fused_add_rms_norm_quant_triton(x, res_fused, weight, 1e-5, dtype)
        unfused = fused_add_rms_norm_triton(x, res_unfused, weight, 1e-5)
        oracle = fused_add_rms_norm_quant_ref(x, res_ref, weight, 1e-5, dtype)
        assert torch.equal(res_fused, res_unfused)
    else:
        out = rms_norm_quant_triton(x, weight, 1e-5, dtype)
        unfused = rms_norm_triton(x, weight, 1e-5)
        oracle = rms_norm_quant_ref(x, weight, 1e-5, dtype)
    assert_same_bits(out, quantize_activation(unfused, dtype))
    assert_one_step_from(out, oracle)
    if rows > 1:
        assert torch.all(out.values[1].float() == 0) and torch.all(out.scales[1] < 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("intermediate", [96, 300])  # the interpreter's block is 128: one block, or 3 per pass
def test_silu_and_mul_quant(dtype, in_dtype, rows, intermediate):
    """Bit-equal to act_quant_ref of silu_and_mul_triton's output: the same block function
    (_silu_and_mul_block) and act_quant's shared steps, whether the row is one block held in registers or
    is recomputed in a second pass."""
    x = _inputs(rows, 2 * intermediate, in_dtype)
    out = silu_and_mul_quant_triton(x, dtype)
    assert_same_bits(out, quantize_activation(silu_and_mul_triton(x), dtype))
    assert_one_step_from(out, silu_and_mul_quant_ref(x, dtype))


@pytest.mark.parametrize("block", [64, 512])
def test_silu_and_mul_quant_block_is_tuning_only(block):
    x = _inputs(3, 2 * 300, torch.bfloat16)
    assert_same_bits(silu_and_mul_quant_triton(x, torch.int8, block=block), silu_and_mul_quant_triton(x, torch.int8))


# -- the product of an activation that arrives quantized ------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 6])
def test_w8a8_gemv_given_scales_equals_in_kernel_quantization(dtype, m):
    """The GEMV reading 8-bit x and its scales (QUANT_X off: the fused path) computes the same float32
    expressions in the same order as the GEMV quantizing x itself (the unfused one-launch path): equal bits."""
    x, w = _inputs(m, 128), _inputs(40, 128) / 10
    wq, sw = act_quant_ref(w, dtype)
    xq, sx = act_quant_ref(x, dtype)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    assert torch.equal(
        w8a8_gemv_triton(xq, sx, wq, sw, bias, torch.float32), w8a8_gemv_triton(x, None, wq, sw, bias, torch.float32)
    )


LINEAR_SHAPES = [(48, 96), (40, 96)]  # fp8 on CUDA: _scaled_mm (N % 16 == 0), the Triton kernel (not)
if torch.cuda.is_available():
    LINEAR_SHAPES.append((4096, 4096))  # Llama-3-8B's o_proj: measured in gemv_configs.json (the H200: skinny)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("n,k", LINEAR_SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_quantized_equals_w8a8_linear(dtype, m, n, k, x_dtype):
    """The pair path (x quantized per token before it arrives) against w8a8_linear on x itself: the same
    product kernel for the shape (on CUDA the gemv table's choice or the default; on CPU the references), fed
    the same 8-bit values and scales, so equal bits."""
    x, w = _inputs(m, k, x_dtype), _inputs(n, k) / 10
    wq, sw = act_quant_ref(w, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(x_dtype).to(DEVICE)
    q = quantize_activation(x, dtype)
    out = w8a8_linear_quantized(q.values, q.scales, wq, sw, bias, q.dtype)
    assert out.dtype == x_dtype
    assert torch.equal(out, w8a8_linear(x, wq, sw, bias))


def test_w8a8_linear_quantized_refuses_mixed_dtypes():
    q = quantize_activation(torch.ones(2, 32, device=DEVICE), torch.int8)
    wq, sw = act_quant_ref(torch.ones(8, 32, device=DEVICE), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="one 8-bit dtype"):
        w8a8_linear_quantized(q.values, q.scales, wq, sw, None, torch.float32)
