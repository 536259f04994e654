"""Triton kernels against their PyTorch references.

On a machine without CUDA the kernels run under Triton's CPU interpreter, which must be switched on
before anything imports triton: this module sets TRITON_INTERPRET=1 for itself, and a conftest that
imports mini_infer earlier must set it too. With CUDA the kernels are compiled and run on the GPU.
Shapes stay small: the interpreter runs every program of the grid in Python.
"""

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels import get_ops  # noqa: E402
from mini_infer.kernels.activation import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from mini_infer.kernels.decode_attention import DecodeConfig, decode_attention_triton  # noqa: E402
from mini_infer.kernels.gemv import GemvConfig, gemv_triton, linear_ref, linear_triton  # noqa: E402
from mini_infer.kernels.paged_attention import decode_attention_ref, prefill_attention_ref  # noqa: E402
from mini_infer.kernels.prefill_attention import (  # noqa: E402
    PrefillConfig,
    build_prefill_tiles,
    max_prefill_tiles,
    prefill_attention_triton,
)
from mini_infer.kernels.rmsnorm import (  # noqa: E402
    _rms_norm_kernel,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and type(_rms_norm_kernel).__name__ != "InterpretedFunction":
    pytest.fail(
        "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on the CPU: "
        "set os.environ.setdefault('TRITON_INTERPRET', '1') in tests/conftest.py before importing mini_infer",
        pytrace=False,
    )

# Tolerances per dtype: float32 paths match to rounding; bfloat16 ones within a unit or two in the
# last place of the output (attention also rounds P to bfloat16 before P @ V, as the GPU does).
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# The interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: one unit in the
# last place of slack on the CPU for results that are otherwise bit-exact.
ONE_ULP = {
    torch.float32: dict(atol=0, rtol=0),
    torch.bfloat16: dict(atol=0, rtol=0 if DEVICE == "cuda" else 2**-7),
}


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def test_triton_ops_table():
    ops = get_ops("triton")
    assert ops.name == "triton"
    assert ops.decode_attention is decode_attention_triton
    assert ops.prefill_attention is prefill_attention_triton
    assert ops.linear is linear_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 96)])
def test_rms_norm(shape, dtype):
    x = _randn(*shape, dtype=dtype)
    weight = _randn(shape[-1], dtype=dtype)
    out = rms_norm_triton(x, weight, 1e-5)
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-5), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 96)])
def test_fused_add_rms_norm(shape, dtype):
    x, residual = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype)
    weight = _randn(shape[-1], dtype=dtype)
    residual_ref = residual.clone()
    out = fused_add_rms_norm_triton(x, residual, weight, 1e-6)
    out_ref = fused_add_rms_norm_ref(x, residual_ref, weight, 1e-6)
    torch.testing.assert_close(residual, residual_ref, **ONE_ULP[dtype])
    torch.testing.assert_close(out, out_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n,k,bias,config", [
    (37, 200, False, None),  # ragged N and K: masked tails on both
    (48, 256, True, None),  # even K, with a bias (Qwen2's QKV)
    (10, 96, False, GemvConfig(block_n=4, block_k=32, num_stages=2)),
])  # fmt: skip
def test_gemv(rows, n, k, bias, config, dtype):
    x = _randn(rows, k, dtype=dtype)
    w = _randn(n, k, dtype=dtype) / k**0.5
    b = _randn(n, dtype=dtype) if bias else None
    torch.testing.assert_close(gemv_triton(x, w, b, config), linear_ref(x, w, b), **TOLERANCE[dtype])


def test_linear_triton_takes_the_gemv_only_for_few_rows():
    w = _randn(24, 64)
    for rows in (1, 2, 5):
        x = _randn(rows, 64)
        torch.testing.assert_close(linear_triton(x, w), linear_ref(x, w), **TOLERANCE[torch.float32])
    with pytest.raises(ValueError, match="at most 2 rows"):
        gemv_triton(_randn(3, 64), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,intermediate", [(7, 96), (3, 2048)])
def test_silu_and_mul(tokens, intermediate, dtype):
    x = _randn(tokens, 2 * intermediate, dtype=dtype)
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), **TOLERANCE[dtype])


def _paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype):
    """Random caches and block tables that scatter each sequence over shuffled blocks."""
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    max_blocks = max(1, *blocks_per_seq) + 1  # one spare column: unused entries stay 0
    num_blocks = sum(blocks_per_seq) + 2
    k_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    order = torch.randperm(num_blocks - 1, device=DEVICE) + 1  # block 0 is never handed out
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32, device=DEVICE)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = order[used : used + n].int()
        used += n
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, block_tables, seq_lens_t


# (block_size, q heads, kv heads, head_dim, dtype): GQA ratios 1, 4 and 8, both head dims and dtypes.
ATTENTION_CASES = [
    (16, 4, 4, 64, torch.float32),
    (32, 8, 2, 128, torch.bfloat16),
    (16, 8, 1, 64, torch.bfloat16),
    (32, 16, 2, 128, torch.float32),
]


@pytest.mark.parametrize("block_size,num_q_heads,num_kv_heads,head_dim,dtype", ATTENTION_CASES)
@pytest.mark.parametrize(
    "config",
    [
        DecodeConfig(),
        DecodeConfig(block_n=16, num_splits=3),
        # splits capped at 32 keys: most sequences end before the last split, which must be skipped
        DecodeConfig(block_n=16, programs_per_sm=0, min_split_tokens=16, max_split_tokens=32),
    ],
    ids=["auto-splits", "three-splits", "capped-splits"],
)
def test_decode_attention(block_size, num_q_heads, num_kv_heads, head_dim, dtype, config):
    seq_lens = [37, 0, 1, 100]  # row 1 is CUDA-graph padding and must come out as zeros
    k_cache, v_cache, block_tables, seq_lens_t = _paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    # q as a strided view of a wider buffer, as the engine slices it out of qkv
    q = _randn(len(seq_lens), num_q_heads + 2, head_dim, dtype=dtype)[:, 1 : 1 + num_q_heads]
    scale = head_dim**-0.5
    out = decode_attention_triton(q, k_cache, v_cache, seq_lens_t, block_tables, scale, config=config)
    ref = decode_attention_ref(q, k_cache, v_cache, seq_lens_t, block_tables, scale)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("block_size,num_q_heads,num_kv_heads,head_dim,dtype", ATTENTION_CASES)
def test_prefill_attention_with_cached_prefix(block_size, num_q_heads, num_kv_heads, head_dim, dtype):
    # (cached prefix, new tokens) per sequence: a fresh prompt, a prefix-cache hit, an empty chunk,
    # and a chunk longer than one query tile after an unaligned prefix.
    chunks = [(0, 5), (20, 17), (9, 0), (37, 70)]
    seq_lens = [p + n for p, n in chunks]
    k_cache, v_cache, block_tables, seq_lens_t = _paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    cu = [0]
    for _, n in chunks:
        cu.append(cu[-1] + n)
    cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    q = _randn(cu[-1], num_q_heads, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    config = PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)
    out = prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, seq_lens_t, block_tables, scale, config=config)
    ref = prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens_t, block_tables, scale)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


def test_prefill_attention_default_config_and_tiny_head_dim():
    """Head dim 8 (stories260K) pads to a 16-wide dot; default tile sizes, no max_seqlen_q."""
    chunks = [(3, 11), (0, 6)]
    seq_lens = [p + n for p, n in chunks]
    k_cache, v_cache, block_tables, seq_lens_t = _paged_kv(seq_lens, 16, 4, 8, torch.float32)
    cu_seqlens_q = torch.tensor([0, 11, 17], dtype=torch.int32, device=DEVICE)
    q = _randn(17, 8, 8)
    out = prefill_attention_triton(q, k_cache, v_cache, cu_seqlens_q, seq_lens_t, block_tables, 0.35)
    ref = prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens_t, block_tables, 0.35)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    decode_q = _randn(2, 8, 8)
    out = decode_attention_triton(decode_q, k_cache, v_cache, seq_lens_t, block_tables, 0.35)
    ref = decode_attention_ref(decode_q, k_cache, v_cache, seq_lens_t, block_tables, 0.35)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


def test_prefill_tile_list_heaviest_first_and_padded():
    """The work list a CUDA graph launches with: fixed capacity, -1 rows unused, most keys first."""
    tiles = build_prefill_tiles(np.array([70, 5, 0]), np.array([70, 105, 9]), block_m=32, capacity=8)
    assert tiles.tolist() == [[1, 0], [0, 2], [0, 1], [0, 0], [-1, -1], [-1, -1], [-1, -1], [-1, -1]]
    assert max_prefill_tiles(75, 3, 32) == 6 and max_prefill_tiles(2, 5, 32) == 3
    with pytest.raises(ValueError, match="do not fit"):
        build_prefill_tiles(np.array([70]), np.array([70]), block_m=32, capacity=2)


def test_prefill_attention_with_padded_tile_list():
    """Chunks of 40, 1 and 23 new tokens over cached prefixes, launched with spare -1 tiles as in a graph."""
    chunks = [(5, 40), (30, 1), (0, 23)]
    seq_lens = [p + n for p, n in chunks]
    k_cache, v_cache, block_tables, seq_lens_t = _paged_kv(seq_lens, 16, 2, 16, torch.float32)
    q_lens = np.array([n for _, n in chunks])
    cu_seqlens_q = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device=DEVICE)
    q = _randn(int(q_lens.sum()), 4, 16)
    config = PrefillConfig(block_m=16, block_n=16)
    capacity = max_prefill_tiles(int(q_lens.sum()), 5, config.block_m)
    tiles = torch.from_numpy(build_prefill_tiles(q_lens, np.array(seq_lens), 16, capacity)).to(DEVICE)
    out = prefill_attention_triton(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens_t, block_tables, 0.25, tiles=tiles, config=config
    )
    ref = prefill_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens_t, block_tables, 0.25)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


# ---------------------------------------------------------------------------------------------------
# Fused attention prologue: q/k norm (Qwen3) + RoPE + KV-cache store on views of the fused qkv buffer.

from mini_infer.kernels.rotary_store import (  # noqa: E402
    rotary_ref,
    rotary_store_kv_ref,
    rotary_store_kv_triton,
    store_kv_cache_ref,
)


def _cos_sin_cache(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, device=DEVICE).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _prologue_inputs(num_q_heads, num_k_heads, head_dim, dtype, norm, tokens=9, block_size=4, num_blocks=6):
    qkv = _randn(tokens, (num_q_heads + 2 * num_k_heads) * head_dim, dtype=dtype)
    positions = torch.randint(0, 100, (tokens,), device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[[1, 5]] = -1
    k_cache = _randn(num_blocks, block_size, num_k_heads, head_dim, dtype=dtype)
    v_cache = _randn(num_blocks, block_size, num_k_heads, head_dim, dtype=dtype)
    weights = (_randn(head_dim, dtype=dtype), _randn(head_dim, dtype=dtype)) if norm else (None, None)
    return qkv, positions, _cos_sin_cache(128, head_dim), slots, k_cache, v_cache, weights


def _qkv_views(qkv, num_q_heads, num_k_heads, head_dim):
    q, k, v = qkv.split([num_q_heads * head_dim, num_k_heads * head_dim, num_k_heads * head_dim], dim=-1)
    tokens = qkv.shape[0]
    return q.view(tokens, num_q_heads, head_dim), k.view(tokens, -1, head_dim), v.view(tokens, -1, head_dim)


def _unfused_prologue(rms_norm, rotary, store, positions, q, k, v, cache, k_cache, v_cache, slots, weights, eps):
    """The unfused sequence: norm reshaped copies, rotate them, store; q and k are written back so that
    results compare in the qkv buffer."""
    head_dim = q.shape[-1]
    qn, kn = q, k
    if weights[0] is not None:
        qn = rms_norm(q.reshape(-1, head_dim), weights[0], eps).view(q.shape)
        kn = rms_norm(k.reshape(-1, head_dim), weights[1], eps).view(k.shape)
    rotary(positions, qn, kn, cache)
    store(kn, v, k_cache, v_cache, slots)
    q.copy_(qn)
    k.copy_(kn)


def test_rotary_store_kv_in_ops_tables():
    assert get_ops("torch").rotary_store_kv is rotary_store_kv_ref
    assert get_ops("triton").rotary_store_kv is rotary_store_kv_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
def test_rotary_store_kv_ref_is_the_unfused_sequence(norm, dtype):
    shape = (6, 2, 48)
    qkv, positions, cache, slots, k_cache, v_cache, weights = _prologue_inputs(*shape, dtype, norm)
    bufs = [(qkv.clone(), k_cache.clone(), v_cache.clone()) for _ in range(2)]
    (fused, fused_k, fused_v), (old, old_k, old_v) = bufs
    rotary_store_kv_ref(positions, *_qkv_views(fused, *shape), cache, fused_k, fused_v, slots, *weights, 1e-6)
    _unfused_prologue(
        rms_norm_ref,
        rotary_ref,
        store_kv_cache_ref,
        positions,
        *_qkv_views(old, *shape),
        cache,
        old_k,
        old_v,
        slots,
        weights,
        1e-6,
    )
    for out, ref in ((fused, old), (fused_k, old_k), (fused_v, old_v)):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("shape", [(4, 1, 64), (6, 2, 48), (12, 4, 128)])  # GQA; D not a power of 2; 2 q groups
def test_rotary_store_kv_triton(shape, norm, dtype):
    qkv, positions, cache, slots, k_cache, v_cache, weights = _prologue_inputs(*shape, dtype, norm)
    runs = {}
    for name in ("fused", "ref"):
        buf, k_c, v_c = qkv.clone(), k_cache.clone(), v_cache.clone()
        q, k, v = _qkv_views(buf, *shape)
        assert not q.is_contiguous() and not k.is_contiguous()
        op = rotary_store_kv_triton if name == "fused" else rotary_store_kv_ref
        op(positions, q, k, v, cache, k_c, v_c, slots, *weights, 1e-6)
        runs[name] = (buf, k_c, v_c)
    # Against the reference: the norm's sum adds in another order, and on the CPU the interpreter truncates
    # its two bfloat16 roundings; RoPE's cancellations then leave a unit of the inputs' scale, not the output's.
    for out, ref in zip(runs["fused"], runs["ref"]):
        tol = TOLERANCE[dtype]
        if norm and dtype == torch.bfloat16:
            tol = dict(atol=2**-5 * ref.abs().max().item(), rtol=2**-6)
        torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("shape", [(4, 1, 64), (6, 2, 48), (12, 4, 128)])
def test_rotary_store_kv_triton_norms_as_rms_norm_triton(shape, norm, dtype):
    """At position 0 RoPE is the identity (cos 1, sin 0), so the fused op is the q/k norm and the store:
    the same rounding steps and the same order of the sum of squares as rms_norm_triton, bit for bit."""
    qkv, _, cache, slots, k_cache, v_cache, weights = _prologue_inputs(*shape, dtype, norm)
    positions = torch.zeros(qkv.shape[0], dtype=torch.int64, device=DEVICE)
    runs = []
    for fused in (True, False):
        buf, k_c, v_c = qkv.clone(), k_cache.clone(), v_cache.clone()
        q, k, v = _qkv_views(buf, *shape)
        if fused:
            rotary_store_kv_triton(positions, q, k, v, cache, k_c, v_c, slots, *weights, 1e-6)
        else:
            identity = lambda *args: None
            _unfused_prologue(
                rms_norm_triton, identity, store_kv_cache_ref, positions, q, k, v, cache, k_c, v_c, slots, weights, 1e-6
            )
        runs.append((buf, k_c, v_c))
    for out, unfused in zip(*runs):
        torch.testing.assert_close(out, unfused, atol=0, rtol=0)
