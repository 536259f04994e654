"""Sequence: one generation stream's token state (a request with n > 1 has n of them).

Only the scheduler changes it. What the client sees of a sequence (its text, logprobs) is the output
processor's (output_processor.py).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from mini_infer.lora.request import LoRARequest
from mini_infer.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV in host blocks (Sequence.host_blocks)
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or is written by the step in flight)
    num_pending: int = 0  # tokens sampled on the device that the host has not read yet (async steps)
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at first admission
    first_scheduled_time: float | None = None
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full block
    host_blocks: list[int] = field(default_factory=list)  # while swapped: its KV, block by block, in the host pool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def lora_int_id(self) -> int:
        """Its adapter's id; 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def cache_root(self) -> int | None:
        """Where its prefix-cache hash chain starts: None for the base model, the adapter's own root else."""
        return None if self.lora_request is None else self.lora_request.cache_root

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_total_tokens(self) -> int:
        """Tokens the host knows plus those still pending on the device: what the scheduler plans with."""
        return len(self.token_ids) + self.num_pending

    @property
    def reached_max_tokens(self) -> bool:
        """Its pending tokens take it to max_tokens: nothing more to compute, it finishes when they land."""
        return self.num_total_tokens - len(self.prompt_token_ids) >= self.params.max_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, float, int]:
        """Lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time, self.seq_id)
