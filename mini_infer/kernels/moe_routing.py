"""Mixture-of-experts router: softmax over the experts, then the top k, optionally renormalised.

This is the order transformers uses for Qwen2-MoE, Qwen3-MoE and Mixtral (softmax in float32, top-k of
the probabilities, `norm_topk_prob` / Mixtral's unconditional renormalisation), so the same experts
and weights come out. Ties go to the lower expert index: `torch.topk` leaves the order of equal values
to its implementation (on CPU it returned experts 3, 5, 2 for four equal probabilities at 1, 2, 3, 5),
so the reference uses a stable sort and the Triton kernel an arg-max that prefers the lowest index,
and both pick the same experts on every device.
"""

import torch

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton


def moe_topk_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (float32 weights [T, top_k], int32 expert ids [T, top_k]), best first."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    values, ids = values[:, :top_k], ids[:, :top_k]
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return values, ids.to(torch.int32)


# ---------------------------------------------------------------------------------------------------
# Triton: a program owns BLOCK_T tokens with all their experts in registers; top-k is k rounds of
# (max, lowest index holding it, mask it out).


@triton.jit
def _moe_topk_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    logits_stride,
    NUM_EXPERTS: tl.constexpr,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < num_tokens
    mask = row_mask[:, None] & (cols < NUM_EXPERTS)[None, :]
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * logits_stride + cols[None, :]
    x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(row_mask[:, None], x, 0.0)  # padding rows: a harmless uniform softmax
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    probs = tl.where(mask, probs, -1.0)  # padding experts are never picked
    ks = tl.arange(0, BLOCK_K)
    top_values = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        index = tl.min(tl.where(probs == best[:, None], cols[None, :], BLOCK_E), axis=1)
        # a NaN row (CUDA-graph padding whose garbage overflowed) matches nothing: keep its ids in range
        index = tl.minimum(index, NUM_EXPERTS - 1)
        top_values = tl.where(ks[None, :] == j, best[:, None], top_values)
        top_ids = tl.where(ks[None, :] == j, index[:, None], top_ids)
        probs = tl.where(cols[None, :] == index[:, None], -1.0, probs)
    if RENORMALIZE:
        top_values = top_values / tl.sum(top_values, axis=1)[:, None]
    out_offs = rows[:, None] * TOP_K + ks[None, :]
    out_mask = row_mask[:, None] & (ks < TOP_K)[None, :]
    tl.store(weights_ptr + out_offs, top_values, mask=out_mask)
    tl.store(ids_ptr + out_offs, top_ids, mask=out_mask)


def moe_topk_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton moe_topk_ref; one launch, shapes fixed by T and E (no host sync, CUDA-graph safe)."""
    require_triton()
    num_tokens, num_experts = router_logits.shape
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = max(16, next_pow2(num_experts))
    block_t = max(1, min(16, 4096 // block_e))  # a few thousand probabilities in registers per program
    _moe_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits,
        weights,
        ids,
        num_tokens,
        router_logits.stride(0),
        NUM_EXPERTS=num_experts,
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=max(2, next_pow2(top_k)),
    )
    return weights, ids
