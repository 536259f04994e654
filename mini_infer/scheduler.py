"""Continuous batching with chunked prefill, a token budget, priorities and preemption.

Each step spends at most `max_num_batched_tokens` tokens: running sequences first (a decode
costs one token, an unfinished prefill continues its chunks), then waiting sequences in
priority order. When the KV pool runs dry, the lowest-priority, most recently arrived running
sequence is preempted: its blocks are freed and it is recomputed later (its prefix is likely
still cached). Waiting requests take turns by request, not by sequence (`_admission_order`), so
one request's n samples cannot hold back everyone behind it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from mini_infer.block_manager import BlockManager
from mini_infer.config import EngineConfig
from mini_infer.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens of this sequence that run this step

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_total_tokens


@dataclass
class SchedulerOutput:
    """Decodes (one new token each, longest context first), then prefill chunks."""

    decodes: list[ScheduledSeq]
    prefills: list[ScheduledSeq]

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.decodes) + sum(s.num_new_tokens for s in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.static_slots = 0  # static batching: admissions left in the batch being formed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        scheduled: list[ScheduledSeq] = []

        # 1. running sequences, highest priority first; preempt from the other end when out of blocks
        self.running.sort(key=Sequence.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and seq.reached_max_tokens:  # done once its last token lands
                i += 1
                continue
            num_new = seq.num_total_tokens - seq.num_computed_tokens
            if num_new > budget and not chunked:
                i += 1
                continue
            num_new = min(num_new, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self._schedule(scheduled, seq, num_new)
                budget -= num_new
                i += 1

        # 2. waiting sequences, in admission order, while there is budget, room and blocks
        # static batching: when the batch is empty, the next max_num_seqs requests form a new one
        # (over as many prefill steps as that takes); nobody else joins until it has emptied
        static = self.config.static_batching
        if static and not self.running and self.static_slots == 0:
            self.static_slots = self.config.max_num_seqs
        admitted: set[int] = set()
        for seq in self._admission_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs or (static and self.static_slots == 0):
                break
            if seq.num_pending:  # preempted before its last token landed: recompute needs that token
                break
            if not seq.block_table and seq.params.prompt_logprobs is None:  # those need every prompt position
                self.block_manager.match_prefix(seq)
            num_new = seq.num_tokens - seq.num_computed_tokens
            if num_new > budget and not chunked:
                break
            num_new = min(num_new, budget)
            if not self.block_manager.allocate(seq, num_new):
                break
            if not seq.prefix_looked_up:  # count the prompt once, at its first admission
                seq.prefix_looked_up = True
                seq.num_cached_tokens = seq.num_computed_tokens
                self.block_manager.record_lookup(seq)
            admitted.add(seq.seq_id)
            self.static_slots = max(0, self.static_slots - 1)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._schedule(scheduled, seq, num_new)
            budget -= num_new
        if admitted:
            self.waiting = [s for s in self.waiting if s.seq_id not in admitted]
        if not self.waiting:  # the batch being formed took everyone there was: it is closed
            self.static_slots = 0
        # a waiting sequence that could not be admitted must not pin cached blocks meanwhile
        for seq in self.waiting:
            if seq.block_table:
                self.block_manager.free(seq)

        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        # Longest context first: the decode attention kernel starts its programs in row order, so long
        # rows start early and short ones fill the tail (on the H100, 5-7% faster with mixed lengths).
        decodes.sort(key=lambda s: -s.seq.num_computed_tokens)
        return SchedulerOutput(decodes, prefills)

    def _admission_order(self) -> list[Sequence]:
        """Waiting sequences in the order they may be admitted: by priority, and within one priority
        round-robin over the requests in arrival order, so a request's n samples take turns with the
        requests behind it instead of holding them all back (one sample of every request, then a
        second, ...; an earlier request still gets each turn first, so none starves)."""
        self.waiting.sort(key=Sequence.sort_key)
        if len({s.request_id for s in self.waiting}) == len(self.waiting):  # one sequence each: as sorted
            return self.waiting
        order: list[Sequence] = []
        for _, same_priority in itertools.groupby(self.waiting, key=lambda s: s.priority):
            by_request: dict[str, list[Sequence]] = {}
            for seq in same_priority:
                by_request.setdefault(seq.request_id, []).append(seq)
            queues = list(by_request.values())
            for turn in range(max(len(q) for q in queues)):
                order.extend(q[turn] for q in queues if turn < len(q))
        return order

    def _schedule(self, scheduled: list[ScheduledSeq], seq: Sequence, num_new: int) -> None:
        """Adds a sequence to this step and publishes the blocks its chunk fills to the prefix
        cache at once: the forward pass stores every token's K/V before any attention reads,
        so a sequence admitted later in this same step (another of n samples) may share them.
        A block holding a pending token waits until the token lands (the engine publishes it then)."""
        scheduled.append(ScheduledSeq(seq, num_new))
        self.block_manager.cache_full_blocks(seq, min(seq.num_computed_tokens + num_new, seq.num_tokens))

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV, requeue; the tokens so far are kept."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)
        self.num_preemptions += 1

    def advance(self, out: SchedulerOutput) -> None:
        """Marks this step's tokens as computed (their KV is now in the cache)."""
        for s in out.seqs:
            s.seq.num_computed_tokens += s.num_new_tokens

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence and frees its blocks at once."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
