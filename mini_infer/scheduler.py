"""Continuous batching with chunked prefill, a token budget, priorities and preemption.

The scheduler owns the sequences' token state and the KV cache manager: `schedule()` picks what runs
next and `update_from_output()` takes the tokens a step sampled. Each step spends at most
`max_num_batched_tokens` tokens: running sequences first (a decode costs one token, an unfinished
prefill continues its chunks), then waiting sequences. When the KV pool runs dry, the lowest-priority,
most recently arrived running sequence is preempted: its blocks are freed and it is recomputed later
(its prefix is likely still cached), or with preemption_mode="swap" its KV is copied to host blocks and
back (the swapped queue, served before waiting requests; docs/preemption.md). Waiting requests take
turns by request, not by sequence (`_admission_order`), so one request's n samples cannot hold back
everyone behind it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mini_infer.block_manager import BlockManager
from mini_infer.config import EngineConfig
from mini_infer.kv_transfer.connector_base import KVConnectorBase, KVConnectorMetadata
from mini_infer.kv_transfer.host_blocks import HostBlockPool
from mini_infer.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's part of a step, fixed when it is scheduled."""

    seq: Sequence
    start: int  # position of its first token this step (tokens before it are in the KV cache)
    num_new_tokens: int
    samples: bool  # the chunk reaches the sequence's end, so its last logits are sampled
    num_generated: int  # output tokens before the one this step samples (seeds and min_tokens use it)
    draft_token_ids: list[int] = field(default_factory=list)  # speculated tokens, after the chunk's own

    @property
    def num_sampled_rows(self) -> int:
        """Rows of logits this sequence samples: one, or one per draft token plus the bonus row."""
        return 1 + len(self.draft_token_ids) if self.samples else 0


@dataclass
class SchedulerOutput:
    """Decodes (one new token each, or a verify run's 1 + k; longest context first), then prefill chunks."""

    decodes: list[ScheduledSeq]
    prefills: list[ScheduledSeq]
    # swap preemption, for the worker to run before the forward pass: (device block, host block) pairs
    # copied out, then (host block, device block) pairs copied in
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    # structured outputs: returns (constrained sampled rows, their int32 token bitmasks) or None; the runner
    # calls it once the step's forward pass is queued, so the host fills the masks while the device computes
    fill_grammar_bitmask: Callable[[], tuple[list[int], torch.Tensor] | None] | None = None
    # a KV connector's loads and saves for this step (kv_transfer/connector_base.py), or None
    kv_connector_metadata: KVConnectorMetadata | None = None

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def sampling(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if s.samples]

    @property
    def num_decode_rows(self) -> int:
        """Decode queries: one per decode, 1 + k per verify run."""
        return sum(s.num_new_tokens for s in self.decodes)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.decodes) + sum(s.num_new_tokens for s in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)

    @property
    def has_swaps(self) -> bool:
        """KV blocks to copy out or in: the step runs for them even with nothing to compute."""
        return bool(self.blocks_to_swap_out or self.blocks_to_swap_in)


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        max_model_len: int,
        propose: Callable[[Sequence, int], list[int]] | None = None,
        num_host_blocks: int = 0,
        connector: KVConnectorBase | None = None,
    ) -> None:
        """propose(seq, k): up to k draft tokens for a decoding sequence (speculative decoding), or None;
        num_host_blocks: the swap space's size in blocks (preemption_mode="swap"); connector: loads prompt
        KV that another engine computed and saves what this one computes (kv_transfer_config)."""
        self.config = config
        self.connector = connector
        self.propose = propose
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []  # preempted with their KV in host blocks
        self.host_blocks = HostBlockPool(num_host_blocks)
        self.num_preemptions = 0
        self.num_swap_outs = self.num_swap_ins = 0  # preemptions that swapped, and swaps back in
        self._swap_out: list[tuple[int, int]] = []  # this step's copies
        self._swap_in: list[tuple[int, int]] = []
        # speculative decoding: drafts verified, accepted, and accepted at each draft position
        self.spec_num_draft_tokens = self.spec_num_accepted_tokens = 0
        self.spec_num_accepted_per_pos = [0] * (
            config.speculative_config.num_speculative_tokens if config.speculative_config else 0
        )
        self.static_slots = 0  # static batching: admissions left in the batch being formed

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens tokens fits the KV pool at all."""
        return self.block_manager.blocks_needed(num_tokens) <= self.block_manager.num_blocks

    # -- schedule -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        scheduled: list[ScheduledSeq] = []
        self._swap_out, self._swap_in = [], []
        num_swapped = len(self.swapped)  # those swapped out by this step come after, and stay out for it

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
            drafts = self._drafts(seq, budget) if num_new == 1 else []
            if drafts and not self._allocate(seq, num_new + len(drafts)):
                drafts = []  # drafts that do not fit are dropped, never the sequence
            while not self._allocate(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(self._commit(seq, num_new, drafts))
                budget -= num_new + len(drafts)
                i += 1

        # the adapters of the running sequences: at most max_loras, so every step's fit the device slots
        loras = {s.lora_int_id for s in self.running if s.lora_int_id}

        # 2. swapped sequences, before any new one (not those this step swapped out: that would only thrash)
        if num_swapped:
            budget = self._schedule_swapped(budget, scheduled, self.swapped[:num_swapped], loras)
        first_swapped = min(s.sort_key() for s in self.swapped) if self.swapped else None

        # 3. waiting sequences, in admission order, while there is budget, room and blocks
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
            if first_swapped is not None and seq.sort_key() > first_swapped:  # a swapped one comes first
                continue
            num_external = 0  # prompt tokens a KV connector loads: they cost no budget
            if not self._lora_fits(seq, loras):  # its adapter waits for a slot; others may pass
                continue
            if not seq.block_table and seq.params.prompt_logprobs is None:  # those need every prompt position
                self._match_prefix(seq)
                if self.connector is not None:
                    num_external = self.connector.get_num_new_matched_tokens(seq, seq.num_computed_tokens)
            num_new = seq.num_tokens - seq.num_computed_tokens - num_external
            if num_new > budget and not chunked:
                break
            num_new = min(num_new, budget)
            if not self._allocate(seq, num_external + num_new):
                break
            if num_external:
                self.connector.update_state_after_alloc(seq, seq.block_table, num_external)
                seq.num_computed_tokens += num_external
            if seq.first_scheduled_time is None:  # count the prompt once, at its first admission
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = seq.num_computed_tokens  # loaded tokens count as cached, as in vLLM
                self.block_manager.record_lookup(seq.num_tokens, seq.num_computed_tokens - num_external)
            admitted.add(seq.seq_id)
            if seq.lora_int_id:
                loras.add(seq.lora_int_id)
            self.static_slots = max(0, self.static_slots - 1)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._commit(seq, num_new))
            budget -= num_new
        if admitted:
            self.waiting = [s for s in self.waiting if s.seq_id not in admitted]
        if not self.waiting:  # the batch being formed took everyone there was: it is closed
            self.static_slots = 0
        # a waiting sequence that could not be admitted must not pin cached blocks meanwhile
        for seq in self.waiting:
            if seq.block_table:
                self._free_blocks(seq)

        # a verify run (the last token and its drafts) decodes: each of its queries is a decode row
        decodes = [s for s in scheduled if s.num_new_tokens == 1 or s.draft_token_ids]
        prefills = [s for s in scheduled if s.num_new_tokens > 1 and not s.draft_token_ids]
        # Longest context first: the decode attention kernel starts its programs in row order, so long
        # rows start early and short ones fill the tail (on the H100, 5-7% faster with mixed lengths).
        decodes.sort(key=lambda s: -s.start)
        out = SchedulerOutput(decodes, prefills, self._swap_out, self._swap_in)
        if self.connector is not None:
            out.kv_connector_metadata = self.connector.build_connector_meta(out)
        return out

    def _schedule_swapped(
        self, budget: int, scheduled: list[ScheduledSeq], candidates: list[Sequence], loras: set[int]
    ) -> int:
        """Swaps candidates back in, highest priority and earliest arrival first, while their blocks, the
        budget, max_num_seqs and the adapter slots (loras: the running ones') allow; returns the budget left."""
        for seq in sorted(candidates, key=Sequence.sort_key):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if seq.num_pending:  # its last token lands at the end of this engine step: next step
                break
            if not self._lora_fits(seq, loras):
                continue
            num_new = seq.num_total_tokens - seq.num_computed_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            blocks = self.block_manager.allocate(self.block_manager.blocks_needed(seq.num_computed_tokens + num_new))
            if blocks is None:
                break
            self.swapped.remove(seq)
            if seq.lora_int_id:
                loras.add(seq.lora_int_id)
            self._swap_in += zip(seq.host_blocks, blocks)
            self.host_blocks.free(seq.host_blocks)  # rewritten only after this copy: one stream orders both
            seq.block_table, seq.host_blocks = blocks, []
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.num_swap_ins += 1
            self._publish(seq, min(seq.num_computed_tokens, seq.num_tokens))  # a block its last token filled
            scheduled.append(self._commit(seq, num_new))
            budget -= num_new
        return budget

    def _lora_fits(self, seq: Sequence, loras: set[int]) -> bool:
        """Whether seq may join the running ones: the base model, an adapter already running, or a free slot."""
        lora_id = seq.lora_int_id
        return not lora_id or lora_id in loras or len(loras) < self.config.max_loras

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        """Draft tokens for a decoding sequence: at most what its budget, max_tokens and max_model_len
        leave room for after the token it samples anyway."""
        if self.propose is None or seq.num_pending:
            return []
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
        k = min(self.config.speculative_config.num_speculative_tokens, room - 1, budget - 1)
        return self.propose(seq, k) if k > 0 else []

    def _commit(self, seq: Sequence, num_new: int, drafts: list[int] | None = None) -> ScheduledSeq:
        """Fixes a sequence's part of the step and advances it: its tokens count as computed (their KV is
        written in this step's forward pass) and a sampled token as pending. The blocks the chunk fills are
        published to the prefix cache at once: the forward pass stores every token's K/V before any
        attention reads, so a sequence admitted later in this step (another of n samples) may share them.
        A block holding a pending token waits until the token lands (update_from_output publishes it)."""
        start, total = seq.num_computed_tokens, len(seq.token_ids) + seq.num_pending
        samples = start + num_new == total
        drafts = drafts or []
        scheduled = ScheduledSeq(seq, start, num_new + len(drafts), samples, total - len(seq.prompt_token_ids), drafts)
        seq.num_computed_tokens += num_new + len(drafts)  # until verification says how many held
        seq.num_pending += samples
        self._publish(seq, min(seq.num_computed_tokens, seq.num_tokens))
        return scheduled

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

    def _preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's blocks; its tokens so far are kept. With preemption_mode="swap" and
        room in the host pool its KV is copied there first (swapped queue); otherwise it is recomputed
        later (waiting queue). Blocks it shares with others (prefix cache) are copied, never taken from
        them: freeing only drops this sequence's reference."""
        self.num_preemptions += 1
        if self.config.preemption_mode == "swap" and seq.num_computed_tokens:
            n = self.block_manager.blocks_needed(seq.num_computed_tokens)
            host = self.host_blocks.allocate(n)
            if host is not None:
                self._swap_out += zip(seq.block_table[:n], host)
                self.block_manager.free(seq.block_table)  # reused only after the copy: it comes first
                seq.block_table, seq.host_blocks = [], host
                seq.status = SequenceStatus.SWAPPED
                self.swapped.append(seq)
                self.num_swap_outs += 1
                return
        self._free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)

    # -- the KV cache manager, on behalf of a sequence -------------------------------------------
    def _match_prefix(self, seq: Sequence) -> None:
        seq.block_table, seq.block_hashes = self.block_manager.match_prefix(seq.token_ids, seq.cache_root)
        seq.num_computed_tokens = len(seq.block_table) * self.block_manager.block_size

    def _allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.block_manager.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        blocks = self.block_manager.allocate(need)
        if blocks is None:
            return False
        seq.block_table += blocks
        return True

    def _publish(self, seq: Sequence, num_tokens: int) -> None:
        if num_tokens // self.block_manager.block_size <= len(seq.block_hashes):  # no block filled: most steps
            return
        if not seq.block_table:  # swapped out: published when it comes back
            return
        seq.block_hashes += self.block_manager.cache_full_blocks(
            seq.token_ids, seq.block_table, seq.block_hashes, num_tokens, seq.cache_root
        )

    def _free_blocks(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed_tokens = [], [], 0

    # -- update -------------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, token_ids: list) -> list[tuple[Sequence, int, int]]:
        """Appends the token each sampling sequence of `out` got (token_ids in `out.sampling` order; a list
        of tokens for one that speculated), finishes those that reached EOS, a stop token, max_tokens or
        max_model_len, and publishes the blocks the tokens completed. Returns (sequence, its row in
        token_ids, tokens taken) for each sequence that took tokens; one that finished or was aborted
        while the step ran drops them."""
        taken = []
        finished = SequenceStatus.FINISHED
        for row, (s, token) in enumerate(zip(out.sampling, token_ids)):
            seq = s.seq
            seq.num_pending -= 1
            if seq.status is finished:
                continue
            if isinstance(token, list):  # a verified run: accepted drafts, then one more token
                taken.append((seq, row, self._take_verified(seq, s, token)))
                continue
            seq.token_ids.append(token)
            taken.append((seq, row, 1))
            if stop := self._stop(seq, token):
                self.finish(seq, *stop)
            else:
                self._publish(seq, min(seq.num_computed_tokens, len(seq.token_ids)))
        return taken

    def _take_verified(self, seq: Sequence, s: ScheduledSeq, tokens: list[int]) -> int:
        """A verified run of tokens: appended up to a stop, no further; the KV of the rejected drafts is
        dropped (their slots are simply overwritten later). Returns how many tokens were taken."""
        seq.num_computed_tokens = s.start + s.num_new_tokens - len(s.draft_token_ids) + len(tokens) - 1
        self.spec_num_draft_tokens += len(s.draft_token_ids)
        self.spec_num_accepted_tokens += len(tokens) - 1
        for pos in range(len(tokens) - 1):
            self.spec_num_accepted_per_pos[pos] += 1
        for n, token in enumerate(tokens, start=1):
            seq.token_ids.append(token)
            if stop := self._stop(seq, token):
                self.finish(seq, *stop)
                return n
        self._publish(seq, min(seq.num_computed_tokens, len(seq.token_ids)))
        return len(tokens)

    def _stop(self, seq: Sequence, token: int) -> tuple[str, int | None] | None:
        """(finish reason, stop reason) if this token ends the sequence (stop strings are the output
        processor's: they need the text)."""
        params = seq.params
        num_output = len(seq.token_ids) - len(seq.prompt_token_ids)
        at_limit = num_output >= params.max_tokens or len(seq.token_ids) >= self.max_model_len
        if num_output < params.min_tokens:
            return ("length", None) if at_limit else None
        if not params.ignore_eos and token in params.eos_token_ids:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
        return ("length", None) if at_limit else None

    def finish(
        self, seq: Sequence, reason: str, stop_reason: int | str | None = None, num_tokens: int | None = None
    ) -> None:
        """Ends a sequence (finished, aborted or failed) and frees its blocks at once; num_tokens: keep only
        that many (a stop string inside a verified run drops the tokens after it)."""
        if num_tokens is not None:
            del seq.token_ids[num_tokens:]
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
            self.host_blocks.free(seq.host_blocks)
            seq.host_blocks = []
        self._free_blocks(seq)
        if self.connector is not None:
            self.connector.request_finished(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
