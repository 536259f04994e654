"""DeepSeek's expert routers, in float32 as transformers computes them.

V2: softmax scores; `greedy` takes the top k, `group_limited_greedy` first keeps the `topk_group` groups
of experts with the highest single score. V3: sigmoid scores; the choice adds `e_score_correction_bias`
and keeps the groups whose two best biased scores sum highest, but the weights are the unbiased
scores, renormalised with `norm_topk_prob`. Both scale the weights by `routed_scaling_factor`. Plain
torch ops without host syncs, so they run inside CUDA graphs.
"""

import torch


def _group_mask(choice: torch.Tensor, group_scores: torch.Tensor, topk_group: int) -> torch.Tensor:
    """[T, E] bool: the experts of each token's best topk_group groups."""
    T, E = choice.shape
    n_group = group_scores.shape[1]
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1.0)
    return keep.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E).bool()


def deepseek_v2_topk(
    logits: torch.Tensor, top_k: int, method: str, n_group: int | None, topk_group: int | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """router logits [T, E] float32 -> (weights [T, k] float32, expert ids [T, k] int32)."""
    scores = logits.softmax(dim=-1)
    if method == "group_limited_greedy":
        T, E = scores.shape
        groups = scores.view(T, n_group, E // n_group).amax(dim=-1)
        scores = scores.masked_fill(~_group_mask(scores, groups, topk_group), 0.0)
    elif method != "greedy":
        raise ValueError(f"topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    weights, ids = scores.topk(top_k, dim=-1)
    return weights * scaling, ids.to(torch.int32)


def deepseek_v3_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router logits [T, E] float32 and the correction bias [E] -> (weights, expert ids) as above."""
    scores = logits.sigmoid()
    choice = scores + bias.float()
    T, E = choice.shape
    groups = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    choice = choice.masked_fill(~_group_mask(choice, groups, topk_group), float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids.to(torch.int32)
