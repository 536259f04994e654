"""The LoRA shrink / expand Triton kernels against their PyTorch references (under the interpreter on
CPU), over a mixed batch: tokens of several adapter slots, interleaved, and tokens of the base (-1)."""

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels.lora import (  # noqa: E402
    LoRAIndex,
    build_lora_tiles,
    lookup_config,
    lora_expand_ref,
    lora_expand_tiled,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_tiled,
    lora_shrink_triton,
    max_lora_tiles,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _index(slots: list[int], max_loras: int, block_m: int) -> LoRAIndex:
    sorted_tokens, tiles = build_lora_tiles(np.array(slots), max_loras, block_m)
    put = lambda a: torch.from_numpy(a).to(DEVICE)  # noqa: E731
    num_tiles = np.array([(tiles[:, 0] >= 0).sum()], dtype=np.int32)
    return LoRAIndex(put(np.array(slots, dtype=np.int32)), put(sorted_tokens), put(tiles), put(num_tiles), block_m)


def test_tiles_cover_each_adapters_tokens_once():
    slots = [2, -1, 0, 2, 2, -1, 0, 1, 2, 2]
    sorted_tokens, tiles = build_lora_tiles(np.array(slots * 4), 4, block_m=16)
    slots = slots * 4
    assert tiles.shape == (max_lora_tiles(40, 4), 3)
    seen = []
    for slot, start, end in tiles:
        if slot < 0:
            continue
        assert 0 < end - start <= 16
        rows = sorted_tokens[start:end].tolist()
        assert all(slots[r] == slot for r in rows)
        seen += rows
    assert sorted(seen) == [i for i, s in enumerate(slots) if s >= 0]
    # no adapter at all: every tile unused
    _, none = build_lora_tiles(np.full(5, -1), 4, block_m=16)
    assert (none[:, 0] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m", [16, 64])
def test_shrink_expand_match_reference(dtype, block_m):
    torch.manual_seed(0)
    num_loras, rank, hidden = 3, 8, 48
    slices = (0, 32, 48, 64)  # a fused q/k/v: three slices of unequal width
    slots = [0, -1, 2, 2, 1, -1, 0, 2, 1, 1, 0, -1, 2] * 3
    index = _index(slots, num_loras, block_m)
    x = torch.randn(len(slots), hidden, device=DEVICE).to(dtype)
    lora_a = (torch.randn(num_loras, 3 * rank, hidden, device=DEVICE) * 0.2).to(dtype)
    lora_b = (torch.randn(num_loras, slices[-1], rank, device=DEVICE) * 0.2).to(dtype)
    y = torch.randn(len(slots), slices[-1], device=DEVICE).to(dtype)

    s_ref = lora_shrink_ref(x, lora_a, index.token_slots)
    s_tri = lora_shrink_tiled(x, lora_a, index)
    active = index.token_slots >= 0
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s_tri.sum(0)[active], s_ref[active], **tol)
    # K = 48 over three programs per tile, summed by expand; two programs along the tile list, each
    # looping over every other used tile
    split = lora_shrink_triton(
        x, lora_a, index.sorted_tokens, index.tiles, index.num_tiles, block_m, block_k=16, split_k=3, tile_programs=2
    )
    assert split.shape[0] == 3
    torch.testing.assert_close(split.sum(0)[active], s_ref[active], **tol)

    y_ref = lora_expand_ref(y.clone(), s_ref, lora_b, index.token_slots, list(slices))
    y_tri = lora_expand_tiled(y.clone(), s_ref, lora_b, index, slices)  # one 64-column block over 3 slices
    torch.testing.assert_close(y_tri, y_ref, **tol)
    y_split = lora_expand_tiled(y.clone(), split, lora_b, index, slices)
    torch.testing.assert_close(y_split, y_ref, **tol)
    # 16-column blocks (one slice each), two per program, two programs along the tile list
    y_blocks = lora_expand_triton(
        y.clone(),
        split,
        lora_b,
        index.sorted_tokens,
        index.tiles,
        index.num_tiles,
        block_m,
        slices,
        block_n=16,
        col_blocks=2,
        tile_programs=2,
    )
    torch.testing.assert_close(y_blocks, y_ref, **tol)
    assert torch.equal(y_tri[~active], y[~active])  # base rows untouched
    assert not torch.allclose(y_tri[active], y[active])  # the adapters did add something


def test_unused_slots_and_empty_batch():
    """No token with an adapter: both kernels leave the output alone (a CUDA graph's padding)."""
    index = _index([-1] * 4, 2, 16)
    x = torch.randn(4, 16, device=DEVICE)
    y = torch.randn(4, 16, device=DEVICE)
    lora_a = torch.randn(2, 8, 16, device=DEVICE)
    lora_b = torch.randn(2, 16, 8, device=DEVICE)
    s = lora_shrink_tiled(x, lora_a, index)
    assert index.num_tiles.item() == 0
    out = lora_expand_tiled(y.clone(), s, lora_b, index, (0, 16))
    assert torch.equal(out, y)


def test_config_lookup_takes_the_smallest_listed_token_count():
    table = {"GPU": {"bfloat16": {"shrink": {"16": {"48x4096": {"split_k": 4}}, "128": {"48x4096": {"split_k": 8}}}}}}
    assert lookup_config(table, "GPU", torch.bfloat16, "shrink", 9, "48x4096") == {"split_k": 4}
    assert lookup_config(table, "GPU", torch.bfloat16, "shrink", 100, "48x4096") == {"split_k": 8}
    assert lookup_config(table, "GPU", torch.bfloat16, "shrink", 300, "48x4096") == {}  # beyond: the defaults
    assert lookup_config(table, "GPU", torch.bfloat16, "shrink", 16, "16x4096") == {}
    assert lookup_config(table, "other GPU", torch.bfloat16, "shrink", 16, "48x4096") == {}
