"""What a worker is sent of a step: the SchedulerOutput with each Sequence cut down to what a forward
pass reads (its id, sampling parameters, block table and the tokens of this step's chunk), so the
pickle grows with the step's new tokens and the batch, not with every sequence's whole context."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mini_infer.sampling_params import SamplingParams
from mini_infer.scheduler import ScheduledSeq, SchedulerOutput


class TokenWindow:
    """The tokens [start, start + len) of a longer list, indexed by their positions in that list."""

    def __init__(self, start: int, tokens: list[int]) -> None:
        self.start, self.tokens = start, tokens

    def __getitem__(self, index: slice) -> list[int]:
        begin = (index.start or 0) - self.start
        if begin < 0 or index.step not in (None, 1):
            raise IndexError(f"positions {index} are outside this window (from {self.start})")
        return self.tokens[begin : None if index.stop is None else index.stop - self.start]


@dataclass
class WireSequence:
    """The fields of a Sequence that ModelRunner.execute reads on a worker (which does not sample)."""

    seq_id: int
    params: SamplingParams
    block_table: list[int]
    token_ids: TokenWindow
    num_prompt_tokens: int
    prompt_token_ids: list[int]  # only for prompt logprobs (the targets); empty otherwise


def _wire(s: ScheduledSeq) -> ScheduledSeq:
    seq = s.seq
    num_own = s.num_new_tokens - len(s.draft_token_ids)
    wire = WireSequence(
        seq.seq_id,
        seq.params,
        seq.block_table,
        TokenWindow(s.start, seq.token_ids[s.start : s.start + num_own]),
        seq.num_prompt_tokens,
        seq.prompt_token_ids if seq.params.prompt_logprobs is not None else [],
    )
    return dataclasses.replace(s, seq=wire)


def wire_output(out: SchedulerOutput) -> SchedulerOutput:
    return SchedulerOutput(
        [_wire(s) for s in out.decodes],
        [_wire(s) for s in out.prefills],
        out.blocks_to_swap_out,  # every rank copies its shard of the same blocks
        out.blocks_to_swap_in,
    )
