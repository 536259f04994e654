"""LoRA shrink and expand over a per-token adapter slot index (SGMV-style): one launch each for every
adapter in the batch, and rows of the base model (slot -1) mixed in.

A LoRA projection adds `expand(shrink(x, A[slot]), B[slot])` to the base output, per token:

- shrink: s[t] = x[t] @ A[slot[t]].T, with A stacked over slots as [L, S * R, K] (the S slices of a
  fused projection, q/k/v or gate/up, share the input, so their A matrices are one stack); s is float32.
  The Triton shrink splits K over programs for decode-sized steps and leaves the partial sums for the
  expand to add up in a fixed order (deterministic, no atomics).
- expand: y[t, slice i] += s[t, i*R:(i+1)*R] @ B[slot[t], slice i].T, with B as [L, N, R] (its rows are
  the output features, each slice's under its own columns of y). The adapter's scaling is folded into B.

The host groups the step's tokens by slot (`build_lora_tiles`): `sorted_tokens` lists the token rows of
slot 0, then slot 1, ...; each tile is (slot, start, end) over that list, at most `block_m` rows of one
adapter. A program owns one tile and one block of output columns, so it reads one adapter's weights
for up to `block_m` tokens. The list has a fixed capacity per token count and unused tiles say -1, so one
launch shape serves every batch of a CUDA graph's size. The references (the CPU path) loop over the
slots present.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mini_infer.kernels._triton import dot, dot_precision, next_pow2, require_triton, tl, triton, upcast_dot


@dataclass
class LoRAIndex:
    """Which adapter slot each token of a step uses, in the forms the kernels read."""

    token_slots: torch.Tensor  # [T] int32, -1 = no adapter (the references read this)
    sorted_tokens: torch.Tensor  # [T] int32: token rows grouped by slot (the Triton kernels read these two)
    tiles: torch.Tensor  # [capacity, 3] int32: (slot, start, end) over sorted_tokens, slot -1 = unused
    num_tiles: torch.Tensor  # [1] int32: the used tiles (the first ones); the kernels loop over these only
    block_m: int  # rows per tile


def lora_block_m(num_tokens: int) -> int:
    """Rows per tile: 16 for decode-sized steps (a few tokens per adapter), 64 for prefills."""
    return 16 if num_tokens <= 512 else 64


MIN_BLOCK_M = 16


def lora_split_k(num_tokens: int, k: int) -> int:
    """Shrink programs per tile along K: up to 8 (at least 512 columns each) for decode-sized steps, whose
    few tiles alone would leave most of the GPU idle; 1 for prefills, which have tiles enough."""
    return 1 if num_tokens > 512 else max(1, min(8, k // 512))


def max_lora_tiles(num_tokens: int, max_loras: int) -> int:
    """Tiles num_tokens tokens over at most max_loras adapters can need with any block_m >= MIN_BLOCK_M
    (each adapter adds at most one partial tile). Bounded for the smallest block, so the capacity grows
    with the token count alone: a CUDA graph's buffer, made at its largest size, holds every smaller list."""
    return -(-num_tokens // MIN_BLOCK_M) + min(max_loras, num_tokens)


def build_lora_tiles(token_slots: np.ndarray, max_loras: int, block_m: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted_tokens int32 [T], tiles int32 [capacity, 3]) for a step whose token t uses adapter slot
    token_slots[t] (-1: none). Tiles are (slot, start, end) rows over sorted_tokens, then (-1, 0, 0)."""
    slots = np.asarray(token_slots, dtype=np.int64)
    num_tokens = len(slots)
    active = np.flatnonzero(slots >= 0)
    order = active[np.argsort(slots[active], kind="stable")]
    sorted_tokens = np.zeros(num_tokens, dtype=np.int32)
    sorted_tokens[: len(order)] = order
    counts = np.bincount(slots[active], minlength=max_loras)
    starts = np.cumsum(counts) - counts
    per_slot = -(-counts // block_m)
    slot_of_tile = np.repeat(np.arange(len(counts)), per_slot)
    first = (
        starts[slot_of_tile]
        + (np.arange(len(slot_of_tile)) - np.repeat(np.cumsum(per_slot) - per_slot, per_slot)) * block_m
    )
    assert block_m >= MIN_BLOCK_M
    capacity = max_lora_tiles(num_tokens, max_loras)
    tiles = np.zeros((capacity, 3), dtype=np.int32)
    tiles[:, 0] = -1
    n = len(slot_of_tile)
    tiles[:n, 0] = slot_of_tile
    tiles[:n, 1] = first
    tiles[:n, 2] = np.minimum(first + block_m, (starts + counts)[slot_of_tile])
    return sorted_tokens, tiles


# ---------------------------------------------------------------------------------------------------
# PyTorch references: the CPU path.


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x [T, K], lora_a [L, N, K], token_slots [T] (-1: none) -> float32 [T, N] (zero rows for -1)."""
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        out[rows] = x[rows].float() @ lora_a[slot].float().T
    return out


def lora_expand_ref(
    y: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor, slice_offsets: list[int]
) -> torch.Tensor:
    """y [T, N] += per slice i: s[:, i*R:(i+1)*R] @ lora_b[slot, off_i:off_{i+1}].T, in place, for rows with
    an adapter. lora_b [L, N, R]; slice_offsets: the slices' first output columns, then N."""
    rank = lora_b.shape[2]
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        for i, (lo, hi) in enumerate(zip(slice_offsets[:-1], slice_offsets[1:])):
            delta = s[rows, i * rank : (i + 1) * rank] @ lora_b[slot, lo:hi].float().T
            y[rows, lo:hi] = (y[rows, lo:hi].float() + delta).to(y.dtype)
    return y


def lora_shrink_torch(x: torch.Tensor, lora_a: torch.Tensor, index: LoRAIndex) -> torch.Tensor:
    return lora_shrink_ref(x, lora_a, index.token_slots)


def lora_expand_torch(
    y: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, index: LoRAIndex, slices: tuple
) -> torch.Tensor:
    """The kernel set's expand: slices are the slices' first columns, then N."""
    return lora_expand_ref(y, s, lora_b, index.token_slots, list(slices))


# ---------------------------------------------------------------------------------------------------
# Launch configs: measured per GPU and shape (benchmarks/lora_kernels.py), else the defaults.

CONFIG_FILE = Path(__file__).with_name("lora_configs.json")
SHRINK_FIELDS = ("block_n", "block_k", "split_k", "tile_programs", "num_warps")
EXPAND_FIELDS = ("block_n", "col_blocks", "tile_programs", "num_warps")


@functools.cache
def _load_configs(path: Path = CONFIG_FILE) -> dict:
    return json.loads(path.read_text())["configs"] if path.exists() else {}


def lookup_config(table: dict, device_name: str, dtype: torch.dtype, op: str, num_tokens: int, shape: str) -> dict:
    """table[GPU][dtype][op][T bucket][shape]: the entry of the smallest listed token count >= num_tokens
    (shrink shape "NxK" with N = slices * rank; expand "NxS" with S = slices * rank), or {}."""
    by_tokens = table.get(device_name, {}).get(str(dtype).removeprefix("torch."), {}).get(op, {})
    for listed in sorted(by_tokens, key=int):
        if int(listed) >= num_tokens:
            return dict(by_tokens[listed].get(shape, {}))
    return {}


@functools.lru_cache(maxsize=1024)
def _tuned(device: torch.device, dtype: torch.dtype, op: str, num_tokens: int, shape: str) -> tuple:
    """The measured config's fields as a tuple of items (cacheable), () off CUDA or where none is listed."""
    if device.type != "cuda":
        return ()
    entry = lookup_config(_load_configs(), torch.cuda.get_device_name(device), dtype, op, num_tokens, shape)
    fields = SHRINK_FIELDS if op == "shrink" else EXPAND_FIELDS
    return tuple((k, int(v)) for k, v in entry.items() if k in fields)


# ---------------------------------------------------------------------------------------------------
# Triton: programs over (tile programs, blocks of output columns[, K splits]); tile program p does used
# tiles p, p + P, p + 2P, ... (P = tile_programs, the tile list's capacity by default: one tile each).


# The split stride (T * N) changes with the step's token count, and tile_programs with the tile list's
# capacity: not specialized on, so a batch size does not compile a second variant in the middle of a run.
@triton.jit(do_not_specialize=["tile_programs", "stride_os"])
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    sorted_ptr,
    tiles_ptr,
    num_tiles_ptr,
    tile_programs,
    stride_xm,
    stride_al,
    stride_an,
    stride_os,
    stride_om,
    K: tl.constexpr,
    N: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    num_tiles = tl.load(num_tiles_ptr)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    split = tl.program_id(2)
    for tile in range(tl.program_id(0), num_tiles, tile_programs):
        slot = tl.load(tiles_ptr + tile * 3)
        start = tl.load(tiles_ptr + tile * 3 + 1)
        end = tl.load(tiles_ptr + tile * 3 + 2)
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = tl.load(sorted_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        a_base = a_ptr + slot.to(tl.int64) * stride_al
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            at = tl.load(
                a_base + offs_n[None, :] * stride_an + offs_k[:, None],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc += dot(xt, at, UPCAST_DOT, DOT_PRECISION)
        out_ptrs = out_ptr + split * stride_os + rows[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["tile_programs", "stride_ss"])
def _lora_expand_kernel(
    s_ptr,
    b_ptr,
    y_ptr,
    sorted_ptr,
    tiles_ptr,
    num_tiles_ptr,
    tile_programs,
    slice1,
    slice2,
    stride_ss,
    stride_sm,
    stride_bl,
    stride_bn,
    stride_ym,
    N: tl.constexpr,
    RANK: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    SPLIT_K: tl.constexpr,
    COL_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Every slice in one launch: the tile's whole s row block [BLOCK_M, S * R] times a block-diagonal
    [S * R, BLOCK_N] view of B (s column j meets output column n only where both are in one slice), so a
    column block may straddle slices and no program is left without work."""
    num_tiles = tl.load(num_tiles_ptr)
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SLICES * RANK
    slice_of_s = offs_s // RANK
    col0 = tl.program_id(1) * (COL_BLOCKS * BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tile_programs):
        slot = tl.load(tiles_ptr + tile * 3)
        start = tl.load(tiles_ptr + tile * 3 + 1)
        end = tl.load(tiles_ptr + tile * 3 + 2)
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = tl.load(sorted_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        s_ptrs = s_ptr + rows[:, None] * stride_sm + offs_s[None, :]
        st = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):  # the shrink's split-K partial sums, added in a fixed order
            st += tl.load(s_ptrs + split * stride_ss, mask=mask_m[:, None] & mask_s[None, :], other=0.0)
        b_base = b_ptr + slot.to(tl.int64) * stride_bl
        for c in range(COL_BLOCKS):  # s is read once for this many column blocks
            offs_n = col0 + c * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            slice_of_n = (offs_n >= slice1).to(tl.int32) + (offs_n >= slice2).to(tl.int32)
            in_block = (slice_of_s[:, None] == slice_of_n[None, :]) & mask_s[:, None] & mask_n[None, :]
            bt = tl.load(b_base + offs_n[None, :] * stride_bn + (offs_s % RANK)[:, None], mask=in_block, other=0.0)
            acc = tl.dot(st, bt.to(tl.float32), input_precision=DOT_PRECISION)  # s is float32: B is upcast
            y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
            mask = mask_m[:, None] & mask_n[None, :]
            yt = tl.load(y_ptrs, mask=mask, other=0.0)
            tl.store(y_ptrs, (yt.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def lora_shrink_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    sorted_tokens: torch.Tensor,
    tiles: torch.Tensor,
    num_tiles: torch.Tensor,
    block_m: int,
    *,
    block_n: int = 64,
    block_k: int = 64,
    split_k: int | None = None,
    tile_programs: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Triton lora_shrink_ref over a tile list (build_lora_tiles): x [T, K], lora_a [L, N, K] -> float32
    partial sums [split_k, T, N] (their sum is the reference's [T, N]), which lora_expand_triton adds up;
    rows without an adapter are left unwritten (expand never reads them). A decode step has few tiles
    (one or two per adapter), so K is split over programs to keep the GPU busy (`lora_split_k`).
    tile_programs: programs along the tile list (at most its capacity, the default)."""
    require_triton()
    num_tokens, k = x.shape
    n = lora_a.shape[1]
    block_n = min(block_n, max(16, next_pow2(n)))
    block_k = min(block_k, max(16, next_pow2(k)))
    split_k = split_k or lora_split_k(num_tokens, k)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(split_k, num_tokens, n, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    assert lora_a.stride(2) == 1
    tile_programs = min(tile_programs or tiles.shape[0], tiles.shape[0])
    grid = (tile_programs, triton.cdiv(n, block_n), split_k)
    _lora_shrink_kernel[grid](
        x,
        lora_a,
        out,
        sorted_tokens,
        tiles,
        num_tiles,
        tile_programs,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        out.stride(0),
        out.stride(1),
        K=k,
        N=n,
        K_PER_SPLIT=k_per_split,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        UPCAST_DOT=upcast_dot(x),
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=num_warps,
    )
    return out


def lora_expand_triton(
    y: torch.Tensor,
    s: torch.Tensor,
    lora_b: torch.Tensor,
    sorted_tokens: torch.Tensor,
    tiles: torch.Tensor,
    num_tiles: torch.Tensor,
    block_m: int,
    slices: tuple[int, ...],
    *,
    block_n: int = 64,
    col_blocks: int = 1,
    tile_programs: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Triton lora_expand_ref, in place on y [T, N]: s float32 [T, S * R] or the shrink's partial sums
    [split, T, S * R], lora_b [L, N, R]; slices: the S <= 3 slices' first columns, then N. One launch for
    all slices; col_blocks: column blocks per program (each reads its tile's s once for all of them)."""
    require_triton()
    if y.shape[0] == 0:
        return y
    if s.dim() == 2:
        s = s.unsqueeze(0)
    assert y.stride(1) == 1 and s.stride(2) == 1 and lora_b.stride(2) == 1
    num_slices, n = len(slices) - 1, slices[-1]
    assert 1 <= num_slices <= 3 and y.shape[1] == n, (slices, y.shape)
    bounds = [*slices[1:-1], n, n][:2]  # the first columns of slices 1 and 2 (N where there is none)
    rank = lora_b.shape[2]
    block_n = min(block_n, max(16, next_pow2(n)))
    col_blocks = max(1, min(col_blocks, triton.cdiv(n, block_n)))
    tile_programs = min(tile_programs or tiles.shape[0], tiles.shape[0])
    grid = (tile_programs, triton.cdiv(n, block_n * col_blocks))
    _lora_expand_kernel[grid](
        s,
        lora_b,
        y,
        sorted_tokens,
        tiles,
        num_tiles,
        tile_programs,
        bounds[0],
        bounds[1],
        s.stride(0),
        s.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        y.stride(0),
        N=n,
        RANK=rank,
        NUM_SLICES=num_slices,
        SPLIT_K=s.shape[0],
        COL_BLOCKS=col_blocks,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_S=max(16, next_pow2(num_slices * rank)),
        DOT_PRECISION=dot_precision(y.dtype),
        num_warps=num_warps,
    )
    return y


def lora_shrink_tiled(x: torch.Tensor, lora_a: torch.Tensor, index: LoRAIndex) -> torch.Tensor:
    """The kernel set's shrink, with this GPU's measured config for the shape where there is one."""
    config = dict(_tuned(x.device, x.dtype, "shrink", x.shape[0], f"{lora_a.shape[1]}x{lora_a.shape[2]}"))
    return lora_shrink_triton(x, lora_a, index.sorted_tokens, index.tiles, index.num_tiles, index.block_m, **config)


def lora_expand_tiled(
    y: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor, index: LoRAIndex, slices: tuple
) -> torch.Tensor:
    """The kernel set's expand, with this GPU's measured config for the shape where there is one."""
    shape = f"{lora_b.shape[1]}x{(len(slices) - 1) * lora_b.shape[2]}"
    config = dict(_tuned(y.device, y.dtype, "expand", y.shape[0], shape))
    return lora_expand_triton(
        y, s, lora_b, index.sorted_tokens, index.tiles, index.num_tiles, index.block_m, slices, **config
    )
