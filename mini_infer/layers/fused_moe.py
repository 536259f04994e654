"""A layer's experts as two stacked tensors, routed through the kernel set's fused MoE.

w13_weight [E, 2I, H] holds every expert's gate rows then up rows, w2_weight [E, H, I] its down
projection, so one grouped GEMM serves all experts (kernels/fused_moe.py). Checkpoints come two ways,
and the loader takes both: the Hub's per-expert tensors (`experts.N.gate_proj.weight`, Mixtral's
`experts.N.w1.weight`), which is also what transformers' save_pretrained writes, and transformers' own
fused tensors (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`), which it writes with
save_original_format=False. With tensor parallelism each rank holds a slice of I for every expert and
the partial outputs are summed. With expert parallelism (`enable_expert_parallel`) each rank holds
E / N whole experts instead. Attention is tensor-parallel, so after its all-reduce every rank holds
every token: the dispatch is free (no all-to-all), each rank runs its experts on the tokens routed to
them (the other top-k slots get weight 0) and the same all-reduce combines the ranks' partial sums.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from mini_infer.distributed import get_ep_size, get_tp_rank, get_tp_size
from mini_infer.distributed.communication_op import tensor_model_parallel_all_reduce
from mini_infer.kernels import KernelOps

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")

# checkpoint projection name -> our shard: w1 gate, w3 up (both in w13_weight), w2 down
QWEN_EXPERT_PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
MIXTRAL_EXPERT_PROJECTIONS = {"w1": "w1", "w3": "w3", "w2": "w2"}


def expert_checkpoint_target(name: str, projections: dict[str, str]) -> tuple[str, tuple[str, int | None]] | None:
    """(our parameter name, (shard, expert)) for a checkpoint tensor of an expert, None for any other.
    expert is None for a fused tensor that holds all experts ("w13" or "w2")."""
    if match := _PER_EXPERT.match(name):
        shard = projections.get(match["proj"])
        if shard is None:
            return None
        param = "w2_weight" if shard == "w2" else "w13_weight"
        return f"{match['prefix']}.{param}", (shard, int(match["expert"]))
    if match := _FUSED.match(name):
        shard = "w13" if match["proj"] == "gate_up_proj" else "w2"
        return f"{match['prefix']}.{shard}_weight", (shard, None)
    return None


class FusedMoE(nn.Module):
    """Top-k routing and the experts' SwiGLU MLP.

    round_weights: round the routing weights to the activation dtype before they scale the experts'
    outputs, as transformers' Qwen MoE routers do; Mixtral's keeps them in float32."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        ops: KernelOps,
        round_weights: bool = True,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        ep = get_ep_size()
        split = 1 if ep > 1 else self.tp_size  # expert parallel: whole experts, E / N of them
        if intermediate_size % split:
            raise ValueError(f"{intermediate_size} is not divisible by the tensor-parallel size {split}")
        if num_experts % ep:
            raise ValueError(f"{num_experts} experts are not divisible by the expert-parallel size {ep}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.round_weights, self.ops = round_weights, ops
        self.inter = intermediate_size // split
        self.inter_start = 0 if ep > 1 else self.tp_rank * self.inter
        self.num_local_experts = num_experts // ep
        self.expert_start = self.tp_rank * self.num_local_experts if ep > 1 else 0
        self.expert_parallel = ep > 1
        local = self.num_local_experts
        self.w13_weight = nn.Parameter(torch.empty(local, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(local, hidden_size, self.inter), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self._loaded: set[tuple[str, int]] = set()
        # Called with each forward's expert ids when set (benchmarks count the experts a step touches).
        self.on_route: Callable[[torch.Tensor], None] | None = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        shard, expert = shard_id  # type: ignore[misc]
        inter, start = self.inter, self.inter_start
        first, local = self.expert_start, self.num_local_experts
        if expert is not None and not first <= expert < first + local:
            return  # another rank's expert
        experts = range(first, first + local) if expert is None else [expert]
        if expert is None:
            target, loaded = param.data, loaded[first : first + local]
        else:
            target, loaded = param.data[expert - first : expert - first + 1], loaded.unsqueeze(0)
        if shard == "w2":
            target.copy_(loaded.narrow(2, start, inter))
        elif shard == "w13":  # transformers' fused layout: gate rows, then up rows
            full = loaded.shape[1] // 2
            target[:, :inter].copy_(loaded.narrow(1, start, inter))
            target[:, inter:].copy_(loaded.narrow(1, full + start, inter))
        else:
            offset = 0 if shard == "w1" else inter
            target[:, offset : offset + inter].copy_(loaded.narrow(1, start, inter))
        parts = ("w1", "w3") if shard == "w13" else (shard,)
        self._loaded.update((p, e) for p in parts for e in experts)

    def unloaded_parts(self) -> list[str]:
        """Expert weights a checkpoint load has not written (empty once every expert is loaded)."""
        ours = range(self.expert_start, self.expert_start + self.num_local_experts)
        missing = [(p, e) for p in ("w1", "w3", "w2") for e in ours if (p, e) not in self._loaded]
        return [f"expert {e} {p}" for p, e in missing]

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = self.ops.moe_topk(router_logits, self.top_k, self.renormalize)
        if self.round_weights:
            weights = weights.to(x.dtype)
        if self.on_route is not None:
            self.on_route(ids)
        if self.expert_parallel:  # slots of other ranks' experts: weight 0 on a local expert
            local = ids - self.expert_start
            outside = (local < 0) | (local >= self.num_local_experts)
            ids, weights = local.masked_fill(outside, 0), weights.masked_fill(outside, 0)
        out = self.ops.fused_experts(x, self.w13_weight, self.w2_weight, weights, ids)
        return tensor_model_parallel_all_reduce(out) if self.tp_size > 1 else out
