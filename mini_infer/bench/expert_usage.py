"""How many experts a MoE decode step touches, counted in an eager rerun of the same requests.

A MoE decode step reads only the weights of the experts its tokens were routed to, so its roofline
needs that count, and the count depends on the batch: one token touches top-k experts per layer, 256
tokens most of them. CUDA graph replays run no Python, so after a timed run the benchmark runs the
same requests again with the graphs set aside, and a hook on every FusedMoE layer counts the distinct
experts of each forward pass whose tokens all decode and number `batch_size`. The prompts and greedy
tokens are the same, so the routing is too. The rerun finds the prompts in the prefix cache, which can
change how prefills are chunked and so the number of pure decode steps; when the counts do not line up
with the timed steps one to one, every step is given their mean.
"""

from __future__ import annotations

from typing import Any

import torch

from mini_infer.forward_context import get_attn_metadata
from mini_infer.layers.fused_moe import FusedMoE


class ExpertCounter:
    """Within `with`: distinct experts per pure decode forward of batch_size tokens, summed over layers."""

    def __init__(self, model: torch.nn.Module, batch_size: int) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
        self.batch_size = batch_size
        self._counts: list[torch.Tensor] = []  # one device scalar per layer per counted forward

    def _count(self, layer: FusedMoE, ids: torch.Tensor) -> None:
        meta = get_attn_metadata()
        if meta.num_prefill_tokens == 0 and ids.shape[0] == self.batch_size:
            hit = torch.zeros(layer.num_experts, dtype=torch.bool, device=ids.device)
            self._counts.append(hit.index_fill_(0, ids.reshape(-1).long(), True).sum())

    def __enter__(self) -> ExpertCounter:
        for layer in self.layers:
            layer.on_route = lambda ids, _layer=layer: self._count(_layer, ids)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.on_route = None

    def per_step(self) -> list[int]:
        """Experts touched by each counted forward, summed over the sparse layers."""
        if not self._counts:
            return []
        values = torch.stack(self._counts).tolist()
        n = len(self.layers)
        return [sum(values[i : i + n]) for i in range(0, len(values) - n + 1, n)]


def count_experts_touched(engine: Any, run: Any, batch_size: int) -> list[int]:
    """Runs `run()` (the timed requests again) eagerly, counting experts per pure decode step; [] for a
    dense model or an engine whose model is not in this process."""
    runner = getattr(engine, "model_runner", None)
    model = getattr(runner, "model", None)
    if model is None or not any(isinstance(m, FusedMoE) for m in model.modules()):
        return []
    graphs, runner.graphs = runner.graphs, None
    try:
        with ExpertCounter(model, batch_size) as counter:
            run()
    finally:
        runner.graphs = graphs
    return counter.per_step()


def align_to_steps(touched: list[int], num_steps: int) -> tuple[list[float] | None, str]:
    """Per timed step: the counts themselves when they line up, else their mean; None when not counted."""
    if not touched:
        return None, "uniform-routing estimate"
    if len(touched) == num_steps:
        return [float(t) for t in touched], "measured per step"
    return [sum(touched) / len(touched)] * num_steps, "measured mean over the rerun's decode steps"
