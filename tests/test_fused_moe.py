"""The fused MoE Triton kernels (router top-k, pair alignment, grouped GEMM and GEMV paths) against
their PyTorch references, under Triton's interpreter on CPU: ragged shapes, experts that get no token,
tokens whose experts tie, all tokens on one expert, 8-bit weights with per-expert scales."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from mini_infer.kernels.fused_moe import (  # noqa: E402
    fused_experts_gemv,
    fused_experts_grouped,
    fused_experts_ref,
    fused_experts_triton,
)
from mini_infer.kernels.moe_align import max_padded_pairs, moe_align_block_size  # noqa: E402
from mini_infer.kernels.moe_config import (  # noqa: E402
    CONFIG_FILE,
    FusedMoeConfig,
    MoeGemmConfig,
    MoeGemvConfig,
    _load_file,
    config_key,
    parse_entry,
)
from mini_infer.kernels.moe_routing import moe_topk_ref, moe_topk_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# 16-row tiles with 32-wide N and K steps: hidden 72 and intermediate 40 leave ragged tails on both
SMALL = FusedMoeConfig(
    gemv_max_tokens=2,
    gemv=MoeGemvConfig(block_n=16, block_k=32),
    gate_up=MoeGemmConfig(block_m=16, block_n=32, block_k=32, group_m=2),
    down=MoeGemmConfig(block_m=16, block_n=32, block_k=32, group_m=1),
    tuned=False,
)


def _experts(num_experts, hidden, inter, dtype):
    gen = torch.Generator().manual_seed(3)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def _routing(num_tokens, num_experts, top_k, only=None, seed=0):
    """Router logits; `only` restricts every token to those experts (the others get no token)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if only is not None:
        mask = torch.full((num_experts,), -1e4)
        mask[only] = 0
        logits = logits + mask
    return logits.to(DEVICE)


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 4), (128, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk(num_experts, top_k, renormalize, dtype):
    logits = _routing(37, num_experts, top_k).to(dtype)
    weights, ids = moe_topk_triton(logits, top_k, renormalize)
    ref_weights, ref_ids = moe_topk_ref(logits, top_k, renormalize)
    assert ids.dtype == ref_ids.dtype == torch.int32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


def test_topk_ties_go_to_the_lower_expert():
    logits = torch.tensor(
        [
            [0.0] * 8,  # all tie: experts 0 and 1
            [0.1, 0.3, 0.3, 0.3, 0.0, 0.3, 0.2, 0.2],  # four tie for two places: 1 and 2
            [0.5, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.9],  # the two best tie: 3 then 7
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0],  # one best, then seven tie for second: 6, 0
        ],
        device=DEVICE,
    )
    expected = torch.tensor([[0, 1], [1, 2], [3, 7], [6, 0]], dtype=torch.int32, device=DEVICE)
    for topk in (moe_topk_ref, moe_topk_triton):
        weights, ids = topk(logits, 2, True)
        assert torch.equal(ids, expected), topk.__name__
        assert torch.equal(weights[0], torch.full((2,), 0.5, device=DEVICE))
        assert weights[1, 0] == weights[1, 1] and weights[2, 0] == weights[2, 1]


def test_topk_nan_rows_stay_in_range():
    """A garbage row (CUDA-graph padding) must still name real experts: the GEMMs index weights by them."""
    logits = torch.full((3, 8), float("nan"), device=DEVICE)
    _, ids = moe_topk_triton(logits, 2, True)
    assert ids.min() >= 0 and ids.max() < 8


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m", [(1, 2, 8, 16), (37, 2, 8, 16), (50, 3, 6, 32)])
def test_align(num_tokens, top_k, num_experts, block_m):
    only = [1, 4] if num_experts == 8 else None  # experts 0, 2, 3, 5, 6, 7 get no pair
    _, ids = moe_topk_ref(_routing(num_tokens, num_experts, top_k, only=only), top_k, True)
    sorted_ids, tile_experts, num_padded = moe_align_block_size(ids, block_m, num_experts)
    num_pairs = ids.numel()
    capacity = max_padded_pairs(num_pairs, num_experts, block_m)
    assert sorted_ids.shape == (capacity,) and tile_experts.shape == (capacity // block_m,)
    counts = torch.bincount(ids.flatten().long(), minlength=num_experts)
    assert num_padded.item() == int(((counts + block_m - 1) // block_m * block_m).sum())
    flat = ids.flatten()
    seen = []
    for tile, expert in enumerate(tile_experts.tolist()):
        rows = sorted_ids[tile * block_m : (tile + 1) * block_m]
        if tile * block_m >= num_padded.item():
            assert expert == num_experts and torch.all(rows == num_pairs)  # past the end: nothing to do
            continue
        real = rows[rows < num_pairs].long()
        assert len(real) > 0 and torch.all(flat[real] == expert)
        assert torch.all(real[1:] > real[:-1])  # stable: pairs keep their order within an expert
        seen += real.tolist()
    assert sorted(seen) == list(range(num_pairs))  # every pair exactly once
    if only is not None:  # empty experts take no tile
        assert set(tile_experts[: num_padded.item() // block_m].tolist()) == set(only)


def test_align_shapes_do_not_depend_on_the_routing():
    """What lets one CUDA graph serve every routing of T tokens."""
    shapes = set()
    for seed, only in ((0, None), (1, [3]), (2, [0, 7])):
        _, ids = moe_topk_ref(_routing(9, 8, 2, only=only, seed=seed), 2, True)
        shapes.add(tuple(t.shape for t in moe_align_block_size(ids, 16, 8)))
    assert len(shapes) == 1


CASES = [
    # (tokens, experts, top_k, experts that receive tokens)
    (1, 8, 2, None),
    (2, 8, 2, [5, 6]),
    (5, 8, 2, [0, 3, 7]),  # five experts get nothing
    (37, 8, 2, None),  # more pairs than a row tile for most experts (grouped path only: a prefill size)
    (20, 4, 1, [2]),  # all on one expert: 20 pairs over two tiles
]


# the GEMV path serves decode batches: not the 37-token case, where the interpreter takes seconds
PATH_CASES = [(path, *case) for path in ("grouped", "gemv") for case in CASES if path == "grouped" or case[0] <= 20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path,num_tokens,num_experts,top_k,only", PATH_CASES)
def test_fused_experts(path, num_tokens, num_experts, top_k, only, dtype):
    hidden, inter = 72, 40
    w13, w2 = _experts(num_experts, hidden, inter, dtype)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    weights, ids = moe_topk_ref(_routing(num_tokens, num_experts, top_k, only=only), top_k, True)
    weights = weights.to(dtype)
    if path == "grouped":
        out = fused_experts_grouped(x, w13, w2, weights, ids, SMALL)
    else:
        out = fused_experts_gemv(x, w13, w2, weights, ids, SMALL.gemv)
    torch.testing.assert_close(out, fused_experts_ref(x, w13, w2, weights, ids), **TOLERANCE[dtype])


def test_fused_experts_with_tied_routing():
    """Tokens whose top-k experts tie in the router: Triton routing + experts equal the reference's."""
    num_experts, top_k, hidden, inter = 8, 2, 72, 40
    w13, w2 = _experts(num_experts, hidden, inter, torch.float32)
    logits = torch.zeros(6, num_experts, device=DEVICE)
    logits[1, [2, 5, 6]] = 1.0  # three tie for two places
    logits[2, [3, 4]] = 0.5
    x = torch.randn(6, hidden, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    ref = fused_experts_ref(x, w13, w2, *moe_topk_ref(logits, top_k, False))
    for config in (SMALL, FusedMoeConfig(**{**SMALL.__dict__, "gemv_max_tokens": 8})):
        out = fused_experts_triton(x, w13, w2, *moe_topk_triton(logits, top_k, False), config=config)
        torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("path", ["grouped", "gemv"])
def test_fused_experts_8bit_weights(path, qdtype):
    """8-bit expert weights with a float32 scale per expert: equal to the reference on dequantized weights."""
    num_experts, top_k, hidden, inter, num_tokens = 4, 2, 72, 40, 9
    gen = torch.Generator().manual_seed(11)
    if qdtype == torch.int8:
        w13 = torch.randint(-127, 128, (num_experts, 2 * inter, hidden), generator=gen, dtype=torch.int8)
        w2 = torch.randint(-127, 128, (num_experts, hidden, inter), generator=gen, dtype=torch.int8)
    else:
        w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 8).to(qdtype)
        w2 = (torch.randn(num_experts, hidden, inter, generator=gen) * 8).to(qdtype)
    # per-expert scales between 0.75x and 1.25x of the one that makes each output about unit size
    w13_scale = (torch.rand(num_experts, generator=gen) * 0.5 + 0.75) / (w13.float().std() * hidden**0.5)
    w2_scale = (torch.rand(num_experts, generator=gen) * 0.5 + 0.75) / (w2.float().std() * inter**0.5)
    w13, w2, w13_scale, w2_scale = (t.to(DEVICE) for t in (w13, w2, w13_scale, w2_scale))
    x = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE, torch.bfloat16)
    weights, ids = moe_topk_ref(_routing(num_tokens, num_experts, top_k), top_k, True)
    weights = weights.to(torch.bfloat16)
    ref = fused_experts_ref(x, w13, w2, weights, ids, w13_scale, w2_scale)
    if path == "grouped":
        out = fused_experts_grouped(x, w13, w2, weights, ids, SMALL, w13_scale, w2_scale)
    else:
        out = fused_experts_gemv(x, w13, w2, weights, ids, SMALL.gemv, w13_scale, w2_scale)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.bfloat16])


def test_dispatch_by_token_count(monkeypatch):
    """Up to gemv_max_tokens tokens take the GEMV path, more the grouped GEMMs; both agree with the reference."""
    import mini_infer.kernels.fused_moe as fused_moe

    taken = []
    for name in ("fused_experts_gemv", "fused_experts_grouped"):
        original = getattr(fused_moe, name)
        monkeypatch.setattr(fused_moe, name, lambda *a, _f=original, _n=name, **k: taken.append(_n) or _f(*a, **k))
    w13, w2 = _experts(8, 72, 40, torch.float32)
    for num_tokens in (2, 3):
        x = torch.randn(num_tokens, 72, device=DEVICE)
        weights, ids = moe_topk_ref(_routing(num_tokens, 8, 2), 2, True)
        out = fused_experts_triton(x, w13, w2, weights, ids, config=SMALL)
        torch.testing.assert_close(out, fused_experts_ref(x, w13, w2, weights, ids), **TOLERANCE[torch.float32])
    assert taken == ["fused_experts_gemv", "fused_experts_grouped"]


def test_shipped_config_file_is_marked_untuned():
    data = _load_file(CONFIG_FILE)
    assert data["untuned_default"]["tuned"] is False
    for device, entries in data["configs"].items():  # only the sweep writes these, from measurements
        for key, entry in entries.items():
            assert entry["tuned"] is True and "sweep" in entry, (device, key)


def test_config_buckets():
    entry = _load_file(CONFIG_FILE)["untuned_default"]
    sizes = sorted(int(s) for s in entry["buckets"])
    assert parse_entry(entry, 1).gate_up == MoeGemmConfig(**entry["buckets"][str(sizes[0])]["gate_up"])
    big = parse_entry(entry, 10**6)
    assert big.down == MoeGemmConfig(**entry["buckets"][str(sizes[-1])]["down"]) and not big.tuned
    assert config_key(128, 2048, 768, torch.bfloat16) == "E=128,H=2048,N=768,dtype=bfloat16"


@pytest.mark.skipif(
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9),
    reason="the smoke run is Triton's interpreter, which needs 3.9 (docs/kernels.md)",
)
def test_sweep_script_writes_an_entry_the_kernel_reads(tmp_path):
    """benchmarks/moe_sweep.py --smoke (the interpreter): it writes only to --out, an entry parse_entry reads,
    under a device name that no GPU has; the shipped file is left as it was."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    shipped = CONFIG_FILE.read_text()
    out = tmp_path / "configs.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "moe_sweep.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent), "TRITON_INTERPRET": "1"}  # on a GPU box too
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert CONFIG_FILE.read_text() == shipped
    ((device, entries),) = json.loads(out.read_text())["configs"].items()
    assert "not a measurement" in device
    entry = entries["E=8,H=48,N=40,dtype=float32"]
    assert entry["sweep"]["smoke"] is True and set(entry["buckets"]) == {"1", "20"}
    config = parse_entry(entry, 20)
    assert config.tuned and config.gemv_max_tokens in (0, 1, 2)
