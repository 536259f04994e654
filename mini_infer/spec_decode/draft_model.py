"""Draft-model proposals: a smaller model with the target's vocabulary proposes k tokens greedily.

The draft keeps its own KV cache in the target's block tables (same blocks, same slots; the pool sizes
both together), and it is written by the same forward passes: after the target runs a step's inputs
(prefill chunks, verify runs), the draft runs them too. So the draft's cache holds every verified
token, and a verify run's rejected tail is overwritten later like the target's. To propose, the draft
decodes k times from the sequence's last token; each pass's tokens stay on the device as the next
pass's inputs, and the host reads all k at once. Every pass goes through the runner's `forward`, which
replays the draft's CUDA graphs where they hold it. Greedy drafting makes q one-hot, which the
rejection sampler takes as it takes n-gram drafts: the emitted tokens keep the target's distribution.
"""

from __future__ import annotations

import torch
from torch import nn

from mini_infer.scheduler import ScheduledSeq, SchedulerOutput
from mini_infer.sequence import Sequence
from mini_infer.worker.step_inputs import Forward, StepInputs, build_decode_rows

PLACEHOLDER = 0  # what the scheduler plans with; the runner writes the draft's tokens over it


def plan_draft_slots(seq: Sequence, k: int) -> list[int]:
    """The scheduler's `propose` for a draft model: k slots, filled by `DraftModel.propose` at execute."""
    return [PLACEHOLDER] * k


class DraftModel:
    prefill_graphs = True  # it runs the step's prefill chunks too

    def __init__(self, model: nn.Module, block_size: int) -> None:
        self.model, self.block_size = model, block_size

    def attention_layers(self) -> list[nn.Module]:
        return self.model.attention_layers()

    def graph_inputs(self) -> dict[str, int]:
        """Inputs beyond token ids and positions: none."""
        return {}

    def graph_output_features(self) -> int:
        """Features per row of the draft's output (its hidden states), which each of its graphs keeps."""
        return self.model.config.hidden_size

    def before_forward(self, out: SchedulerOutput, forward: Forward) -> None:
        """Fills each verify run's draft tokens: k greedy decodes of the draft over all runs at once."""
        verify = [s for s in out.seqs if s.draft_token_ids]
        if verify:
            self._propose(verify, forward)

    def after_forward(
        self, out: SchedulerOutput, inputs: StepInputs, aux: torch.Tensor | None, forward: Forward
    ) -> None:
        """The draft's cache takes the step's tokens too."""
        forward(inputs)

    def _propose(self, verify: list[ScheduledSeq], forward: Forward) -> None:
        runs = sorted(verify, key=lambda s: -len(s.draft_token_ids))  # the runs still drafting: a prefix
        tokens = None  # the last pass's drafts, on the device
        passes: list[torch.Tensor] = []
        for j in range(len(runs[0].draft_token_ids)):
            active = [s for s in runs if j < len(s.draft_token_ids)]
            known = [s.seq.token_ids[s.start] for s in active] if j == 0 else [PLACEHOLDER] * len(active)
            inputs = build_decode_rows(known, [s.start + j for s in active], active, self.block_size)
            device_inputs = {} if tokens is None else {"input_ids": tokens[: len(active)]}
            tokens = self.model.compute_logits(forward(inputs, **device_inputs)).argmax(dim=-1)
            passes.append(tokens)
        drafts = iter(torch.cat(passes).tolist())  # one read back for the k passes
        for j, made in enumerate(passes):
            for s in runs[: len(made)]:
                s.draft_token_ids[j] = next(drafts)
