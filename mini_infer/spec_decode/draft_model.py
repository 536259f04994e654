"""Draft-model proposals: a smaller model with the target's vocabulary proposes k tokens greedily.

The draft keeps its own KV cache in the target's block tables (same blocks, same slots; the pool sizes
both together), and it is written by the same forward passes: after the target runs a step's inputs
(prefill chunks, verify runs), the draft runs them too. So the draft's cache holds every verified
token, and a verify run's rejected tail is overwritten later like the target's. To propose, the draft
decodes k times from the sequence's last token. Greedy drafting makes q one-hot, which the rejection
sampler takes as it takes n-gram drafts: the emitted tokens keep the target's distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mini_infer.scheduler import ScheduledSeq, SchedulerOutput
from mini_infer.sequence import Sequence
from mini_infer.worker.step_inputs import StepInputs, build_decode_rows

PLACEHOLDER = 0  # what the scheduler plans with; the runner writes the draft's tokens over it


def plan_draft_slots(seq: Sequence, k: int) -> list[int]:
    """The scheduler's `propose` for a draft model: k slots, filled by `DraftModel.propose` at execute."""
    return [PLACEHOLDER] * k


class DraftModel:
    def __init__(self, model: nn.Module, block_size: int) -> None:
        self.model, self.block_size = model, block_size

    def attention_layers(self) -> list[nn.Module]:
        return self.model.attention_layers()

    def before_forward(self, out: SchedulerOutput, forward: Callable[[StepInputs, nn.Module], torch.Tensor]) -> None:
        """Fills each verify run's draft tokens: k greedy decodes of the draft over all runs at once."""
        verify = [s for s in out.seqs if s.draft_token_ids]
        if verify:
            self._propose(verify, forward)

    def after_forward(
        self,
        out: SchedulerOutput,
        inputs: StepInputs,
        aux: torch.Tensor | None,
        forward: Callable[[StepInputs, nn.Module], torch.Tensor],
    ) -> None:
        """The draft's cache takes the step's tokens too."""
        forward(inputs, self.model)

    def _propose(self, verify: list[ScheduledSeq], forward: Callable[[StepInputs, nn.Module], torch.Tensor]) -> None:
        active = list(verify)
        tokens = [s.seq.token_ids[s.start] for s in active]  # the run's first input: the last known token
        for j in range(max(len(s.draft_token_ids) for s in active)):
            active, tokens = zip(*[(s, t) for s, t in zip(active, tokens) if j < len(s.draft_token_ids)])
            inputs = build_decode_rows(list(tokens), [s.start + j for s in active], active, self.block_size)
            proposals = self.model.compute_logits(forward(inputs, self.model)).argmax(dim=-1).tolist()
            for s, token in zip(active, proposals):
                s.draft_token_ids[j] = token
            tokens = proposals
