"""The torch backend's CPU fast path: batched attention equals the per-sequence references, and small
steps run single-threaded without changing any result."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from mini_infer import LLM, SamplingParams
from mini_infer.cpu_threads import SMALL_STEP_MACS, step_threads
from mini_infer.kernels import get_ops
from mini_infer.kernels.paged_attention import (
    decode_attention_batched,
    decode_attention_ref,
    decode_keys,
    prefill_attention_batched,
    prefill_attention_ref,
)
from mini_infer.kernels.rmsnorm import fused_add_rms_norm_ref, fused_add_rms_norm_torch, rms_norm_ref, rms_norm_torch
from mini_infer.kernels.rotary_store import _heads_of_both, _keys_and_values, rotary_store_kv_ref
from mini_infer.layers.rotary import build_cos_sin_cache

# (block_size, q heads, kv heads, head_dim, dtype): GQA 1, 4 and 2 (stories260K's 8/4 heads of dim 8).
CASES = [(16, 4, 4, 64, torch.float32), (32, 8, 2, 128, torch.bfloat16), (16, 8, 4, 8, torch.float32)]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _paged(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + 2
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    tables = torch.zeros(len(seq_lens), max(blocks) + 1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = order[used : used + n].int()
        used += n
    return k, v, tables, torch.tensor(seq_lens, dtype=torch.int32), gen


@pytest.mark.parametrize("block_size,num_q_heads,num_kv_heads,head_dim,dtype", CASES)
def test_batched_decode_attention_equals_the_reference(block_size, num_q_heads, num_kv_heads, head_dim, dtype):
    # lengths in three power-of-two block groups, and a padding row (0 keys) that must stay zeros
    seq_lens = [37, 0, 1, 100, 300, 17]
    k, v, tables, lens, gen = _paged(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(seq_lens), num_q_heads + 2, head_dim, generator=gen).to(dtype)[:, 1 : 1 + num_q_heads]
    out = decode_attention_batched(q, k, v, lens, tables, head_dim**-0.5)
    ref = decode_attention_ref(q, k, v, lens, tables, head_dim**-0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("seq_lens", [[40, 33, 61, 40], [50, 50, 50], [7]], ids=["mask", "equal", "one"])
def test_step_wide_decode_keys_equal_the_reference(seq_lens):
    """The engine's path: the step's DecodeKeys built once on the host (no mask when every row has all keys),
    keys and values gathered together from one layer's [2, blocks, ...] pool."""
    block_size, heads, kv_heads, head_dim = 16, 8, 4, 8
    k, v, tables, lens, gen = _paged(seq_lens, block_size, kv_heads, head_dim, torch.float32)
    pool = torch.stack((k, v))  # a layer's pool: its values right after its keys
    keys = decode_keys(tables.numpy(), lens.numpy(), block_size)
    assert (keys.allowed is None) == (len(set(seq_lens)) == 1)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen)
    out = decode_attention_batched(q, pool[0], pool[1], lens, tables, head_dim**-0.5, keys=keys)
    ref = decode_attention_ref(q, k, v, lens, tables, head_dim**-0.5)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("block_size,num_q_heads,num_kv_heads,head_dim,dtype", CASES)
def test_batched_prefill_attention_equals_the_reference(block_size, num_q_heads, num_kv_heads, head_dim, dtype):
    # (cached prefix, new tokens): fresh, prefix hit, empty chunk, long chunk, and one in another length group
    chunks = [(0, 5), (20, 17), (9, 0), (37, 70), (200, 100)]
    seq_lens = [p + n for p, n in chunks]
    k, v, tables, lens, gen = _paged(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    cu = torch.tensor([0, *torch.tensor([n for _, n in chunks]).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_q_heads, head_dim, generator=gen).to(dtype)
    out = prefill_attention_batched(q, k, v, cu, lens, tables, head_dim**-0.5)
    ref = prefill_attention_ref(q, k, v, cu, lens, tables, head_dim**-0.5)
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("hidden", [8, 64, 288, 4096])
@pytest.mark.parametrize("rows", [1, 16, 100])
def test_cpu_rms_norm_is_bit_identical_to_the_reference_in_float32(hidden, rows):
    gen = torch.Generator().manual_seed(hidden + rows)
    x, w = torch.randn(rows, hidden, generator=gen), torch.randn(hidden, generator=gen)
    assert torch.equal(rms_norm_torch(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    r1, r2 = torch.randn(rows, hidden, generator=gen), None
    r2 = r1.clone()
    assert torch.equal(fused_add_rms_norm_torch(x, r1, w, 1e-6), fused_add_rms_norm_ref(x, r2, w, 1e-6))
    assert torch.equal(r1, r2)
    xb, wb = x.bfloat16(), w.bfloat16()  # bfloat16 keeps the reference's rounding steps
    assert torch.equal(rms_norm_torch(xb, wb, 1e-5), rms_norm_ref(xb, wb, 1e-5))


@pytest.mark.parametrize("tokens", [1, 5])
def test_views_of_a_fused_qkv_row_rotate_and_store_in_one_pass(tokens):
    """q, k, v as the attention layer gets them (views of one qkv row): q and k rotate as one view and k, v
    store in one copy into the layer's [2, blocks, ...] pool, one token included (its views' first stride
    is arbitrary), with the same results as separate contiguous tensors."""
    heads, kv_heads, head_dim, block_size = 8, 4, 8, 16
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
    assert _heads_of_both(q, k) is not None and _keys_and_values(k, v) is not None
    qc, kc, vc = q.clone(), k.clone(), v.clone()
    assert _heads_of_both(qc, kc) is None and _keys_and_values(kc, vc) is None
    cache = build_cos_sin_cache(LlamaConfig(head_dim=head_dim), head_dim, 64)
    positions = torch.randint(0, 64, (tokens,), generator=gen)
    slots = torch.randperm(4 * block_size, generator=gen)[:tokens]
    pool = torch.zeros(2, 4, block_size, kv_heads, head_dim)
    separate = torch.zeros_like(pool)
    rotary_store_kv_ref(positions, q, k, v, cache, pool[0], pool[1], slots)
    rotary_store_kv_ref(positions, qc, kc, vc, cache, separate[0], separate[1], slots)
    assert torch.equal(q, qc) and torch.equal(k, kc) and torch.equal(pool, separate)
    assert pool.flatten(1, 2)[1, slots].equal(v)


def test_torch_backend_uses_the_batched_attention():
    ops = get_ops("torch")
    assert ops.decode_attention is decode_attention_batched
    assert ops.prefill_attention is prefill_attention_batched


def test_small_cpu_steps_run_single_threaded():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with step_threads(torch.device("cpu"), SMALL_STEP_MACS - 1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored
        with step_threads(torch.device("cpu"), SMALL_STEP_MACS):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), step_threads(torch.device("cpu"), 0):
            raise RuntimeError("restored on errors too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_thread_count_changes_no_token(stories_path):
    """The same greedy run with the process at 1 thread (every step single-threaded) and at 2 threads
    with the step threshold forced to 0 (every step at 2 threads): identical tokens."""
    import mini_infer.cpu_threads as cpu_threads

    prompts = ["Once upon a time", "Lily and Tom went to the park. They saw a big dog."]
    params = SamplingParams(temperature=0, max_tokens=24)
    llm = LLM(stories_path, max_num_seqs=4)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        torch.set_num_threads(2)
        threshold, cpu_threads.SMALL_STEP_MACS = cpu_threads.SMALL_STEP_MACS, 0
        try:
            two = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            cpu_threads.SMALL_STEP_MACS = threshold
    finally:
        torch.set_num_threads(previous)
    assert one == two and all(len(t) == 24 for t in one)
