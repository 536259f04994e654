"""(token, expert) pairs sorted by expert and padded to the GEMM's row tile, for the grouped GEMM.

Pair p = t * top_k + j is token t's j-th expert. Each expert's pairs form a run padded up to a
multiple of BLOCK_M, so every row tile of the grouped GEMM belongs to one expert and reads one weight
matrix. The padding entries hold P (the number of pairs), which the kernel masks out.

Everything here is a fixed-shape tensor operation: the list has room for the worst case
(P + min(E, P) * (BLOCK_M - 1) rows: each non-empty expert wastes at most BLOCK_M - 1), the padded
length stays on the device, and tiles past it exit at once. So no value goes back to the host and the
same launch serves every routing of T tokens inside a CUDA graph. Experts that get no pair take no
tile. Within an expert, pairs keep their order (a stable sort), which makes the output deterministic.
"""

import torch


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the sorted list needs in the worst case, rounded up to whole tiles."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, top_k] -> (sorted pair ids [R] padded with P, expert of each BLOCK_M tile [R / BLOCK_M]
    (num_experts past the end), padded length [1]), where R = max_padded_pairs(...)."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    capacity = max_padded_pairs(num_pairs, num_experts, block_m)
    experts, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts  # where each expert's run starts in `experts`
    dest = (padded_end - padded)[experts] + torch.arange(num_pairs, device=device) - first[experts]
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    tile_starts = torch.arange(0, capacity, block_m, device=device)
    tile_experts = torch.searchsorted(padded_end, tile_starts, right=True).to(torch.int32)
    return sorted_ids, tile_experts, padded_end[-1:].to(torch.int32)
