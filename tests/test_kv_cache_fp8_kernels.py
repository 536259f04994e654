"""FP8 KV cache kernels against their references (TRITON_INTERPRET=1 without CUDA, as in test_kernels.py).

Each reference is checked against the e4m3 arithmetic written out here (x / scale saturated to ±448 and
rounded to nearest even; reads = e4m3 * scale), and each Triton kernel against its reference: the store
bit for bit, attention within the float32 tolerances of test_kernels.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels.decode_attention import DecodeConfig, decode_attention_triton  # noqa: E402
from mini_infer.kernels.paged_attention import (  # noqa: E402
    decode_attention_batched,
    decode_attention_ref,
    prefill_attention_batched,
    prefill_attention_ref,
)
from mini_infer.kernels.prefill_attention import PrefillConfig, prefill_attention_triton  # noqa: E402
from mini_infer.kernels.rotary_store import rotary_store_kv_ref, rotary_store_kv_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
TOL = dict(atol=2e-5, rtol=2e-5)


def e4m3(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The stored value, written out: x / scale saturated to ±448, rounded to nearest even (torch's cast)."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(FP8)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=DEVICE)


def _cos_sin(max_pos: int, head_dim: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_store_quantizes_like_the_reference(dtype, qk_norm):
    """The fused RoPE + store writes the e4m3 of (rotated k) / k_scale and v / v_scale, the same values in
    Triton and the reference; values beyond 448 * scale saturate, slot -1 writes nothing."""
    torch.manual_seed(0)
    T, Hq, Hk, D, page = 7, 4, 2, 64, 16
    qkv = (torch.randn(T, (Hq + 2 * Hk) * D, device=DEVICE) * 3).to(dtype)
    qkv[2, (Hq + Hk) * D : (Hq + Hk) * D + 4] = -5000.0  # v beyond 448 * v_scale: saturates
    positions = torch.tensor([0, 5, 9, 3, 17, 2, 30], device=DEVICE)
    slots = torch.tensor([0, 17, 5, -1, 33, 2, 40], device=DEVICE)
    cos_sin = _cos_sin(64, D)
    norms = (torch.rand(D, device=DEVICE).to(dtype) + 0.5, torch.rand(D, device=DEVICE).to(dtype) + 0.5)
    norms = norms if qk_norm else (None, None)
    k_scale, v_scale = scalar(0.25), scalar(1.5)
    results = []
    for fn in (rotary_store_kv_ref, rotary_store_kv_triton):
        buf = qkv.clone()
        q, k, v = buf.split([Hq * D, Hk * D, Hk * D], dim=-1)
        q, k, v = q.view(T, Hq, D), k.view(T, Hk, D), v.view(T, Hk, D)
        k_cache = torch.zeros(4, page, Hk, D, dtype=FP8, device=DEVICE)
        v_cache = torch.zeros(4, page, Hk, D, dtype=FP8, device=DEVICE)
        fn(positions, q, k, v, cos_sin, k_cache, v_cache, slots, *norms, 1e-6, k_scale=k_scale, v_scale=v_scale)
        results.append((buf, k_cache, v_cache, k, v))
    # each run's cache holds the e4m3 of its own rotated (and normed) keys, written out: x / scale saturated
    # to ±448, nearest even; values that round to zero may differ in sign only (-0 == 0)
    keep = slots >= 0
    for _, k_cache, v_cache, k, v in results:
        flat_k, flat_v = k_cache.view(-1, Hk, D), v_cache.view(-1, Hk, D)
        assert torch.equal(flat_k[slots[keep]].float(), e4m3(k[keep], 0.25).float())
        assert torch.equal(flat_v[slots[keep]].float(), e4m3(v[keep], 1.5).float())
        assert torch.all(flat_v[slots[2], 0, :4].float() == -448.0)  # saturated, not NaN
        written = torch.zeros(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
        written[slots[keep]] = True
        assert not flat_k[~written].float().any() and not flat_v[~written].float().any()
    (buf_r, kc_r, vc_r, *_), (buf_t, kc_t, vc_t, *_) = results
    # RoPE alone rounds the same in both (but the interpreter truncates to bfloat16): the same stored values
    if not qk_norm and (dtype == torch.float32 or DEVICE == "cuda"):
        assert torch.equal(kc_t.float(), kc_r.float()) and torch.equal(vc_t.float(), vc_r.float())
    # the norm's sum adds in another order in Triton (test_kernels.py's tolerances)
    tol = dict(atol=2**-5 * buf_r.abs().max().item(), rtol=2**-6) if dtype == torch.bfloat16 else TOL
    torch.testing.assert_close(buf_t, buf_r, **tol)


def test_the_store_refuses_an_fp8_pool_without_scales():
    k = torch.randn(2, 1, 16, device=DEVICE)
    cache = torch.zeros(1, 16, 1, 16, dtype=FP8, device=DEVICE)
    for fn in (rotary_store_kv_ref, rotary_store_kv_triton):
        with pytest.raises(ValueError, match="k_scale and v_scale"):
            fn(torch.zeros(2, dtype=torch.long, device=DEVICE), k.clone(), k.clone(), k.clone(), _cos_sin(4, 16),
               cache, cache.clone(), torch.tensor([0, 1], device=DEVICE))  # fmt: skip


def _fp8_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, k_scale, v_scale):
    """Random fp8 caches (values spread over e4m3's range, scaled) and shuffled block tables."""
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = e4m3(torch.randn(*shape, device=DEVICE) * 2, k_scale)
    v_cache = e4m3(torch.randn(*shape, device=DEVICE) * 2, v_scale)
    order = torch.randperm(num_blocks - 1, device=DEVICE) + 1
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32, device=DEVICE)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[used : used + n].int()
        used += n
    return k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


def _dequantized(cache: torch.Tensor, scale: float) -> torch.Tensor:
    return cache.float() * scale


# (block size, q heads, kv heads, head dim): GQA 1 and 4, the stories260K head dim 8
CASES = [(16, 4, 4, 64), (32, 8, 2, 32), (16, 8, 4, 8)]


@pytest.mark.parametrize("block_size,num_q_heads,num_kv_heads,head_dim", CASES)
def test_decode_attention_reads_fp8(block_size, num_q_heads, num_kv_heads, head_dim):
    """Triton decode over an fp8 pool = its reference = attention over the dequantized fp32 pool."""
    torch.manual_seed(1)
    seq_lens = [37, 0, 1, 70]
    k_cache, v_cache, tables, lens = _fp8_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, 0.05, 0.2)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, device=DEVICE)
    scale, ks, vs = head_dim**-0.5, scalar(0.05), scalar(0.2)
    ref = decode_attention_ref(q, k_cache, v_cache, lens, tables, scale, ks, vs)
    plain = decode_attention_ref(q, _dequantized(k_cache, 0.05), _dequantized(v_cache, 0.2), lens, tables, scale)
    assert torch.equal(ref, plain)
    torch.testing.assert_close(decode_attention_batched(q, k_cache, v_cache, lens, tables, scale, ks, vs), ref, **TOL)
    for config in (DecodeConfig(), DecodeConfig(block_n=16, num_splits=3)):
        out = decode_attention_triton(q, k_cache, v_cache, lens, tables, scale, config, k_scale=ks, v_scale=vs)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("block_size,num_q_heads,num_kv_heads,head_dim", CASES)
def test_prefill_attention_reads_fp8(block_size, num_q_heads, num_kv_heads, head_dim):
    torch.manual_seed(2)
    chunks = [(0, 5), (20, 17), (9, 0), (37, 40)]  # (cached prefix, new tokens)
    seq_lens = [p + n for p, n in chunks]
    k_cache, v_cache, tables, lens = _fp8_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, 0.05, 0.2)
    cu = torch.tensor([0, *torch.tensor([n for _, n in chunks]).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(int(cu[-1]), num_q_heads, head_dim, device=DEVICE)
    scale, ks, vs = head_dim**-0.5, scalar(0.05), scalar(0.2)
    ref = prefill_attention_ref(q, k_cache, v_cache, cu, lens, tables, scale, None, ks, vs)
    plain = prefill_attention_ref(q, _dequantized(k_cache, 0.05), _dequantized(v_cache, 0.2), cu, lens, tables, scale)
    assert torch.equal(ref, plain)
    batched = prefill_attention_batched(q, k_cache, v_cache, cu, lens, tables, scale, None, ks, vs)
    torch.testing.assert_close(batched, ref, **TOL)
    config = PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    out = prefill_attention_triton(q, k_cache, v_cache, cu, lens, tables, scale, config=config, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out, ref, **TOL)


def test_bfloat16_queries_read_fp8_in_bfloat16():
    """With bf16 activations the dequantized keys are rounded to bf16 before the dot, in both paths."""
    torch.manual_seed(3)
    k_cache, v_cache, tables, lens = _fp8_paged_kv([40, 9], 16, 2, 64, 0.1, 0.1)
    q = torch.randn(2, 4, 64, device=DEVICE).to(torch.bfloat16)
    ks = vs = scalar(0.1)
    ref = decode_attention_ref(q, k_cache, v_cache, lens, tables, 0.125, ks, vs)
    out = decode_attention_triton(q, k_cache, v_cache, lens, tables, 0.125, k_scale=ks, v_scale=vs)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
