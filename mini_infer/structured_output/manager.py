"""StructuredOutputManager: grammars compiled off the step loop, matchers per sequence, the step's bitmask.

Compilation runs in a thread pool, one future per distinct spec (the cache): the engine holds a
request back until its grammar is ready, so the step loop never waits on a compile. Each step the
manager fills one bitmask row per sampled row of a constrained sequence, the one-row sequences' in a
single call that xgrammar spreads over threads (a JSON row of a 151k-token vocabulary took ~135 us on
one core); a sequence that speculates gets a row per draft position, filled by advancing its
matcher over the drafts and rolling back after.
The matcher then takes the tokens the scheduler appended, and nothing else.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mini_infer.sampling_params import StructuredOutputsParams
from mini_infer.scheduler import ScheduledSeq
from mini_infer.sequence import Sequence
from mini_infer.structured_output.backend import XgrammarBackend

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 1024


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        if tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer")
        self.backend = XgrammarBackend(tokenizer, vocab_size, sorted(stop_token_ids))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.grammars: dict[tuple, Future] = {}  # spec key -> future CompiledGrammar (insertion order = age)
        self.matchers: dict[int, tuple[Sequence, object]] = {}  # seq id -> (sequence, GrammarMatcher)

    # -- compiling ----------------------------------------------------------------------------
    def submit(self, spec: StructuredOutputsParams) -> Future:
        """The future compiled grammar of a spec; compiled once per distinct spec."""
        key = spec.key()
        future = self.grammars.get(key)
        if future is None:
            if len(self.grammars) >= MAX_CACHED_GRAMMARS:
                self.grammars.pop(next(iter(self.grammars)))
            future = self.grammars[key] = self.pool.submit(self.backend.compile, spec)
        return future

    def check(self, spec: StructuredOutputsParams) -> None:
        """Waits for the spec's grammar: ValueError with the compiler's message if it does not compile.
        For callers off the step loop (the server's handlers); the engine's later lookup is a cache hit."""
        self.submit(spec).result()

    # -- per sequence -------------------------------------------------------------------------
    def add(self, seq: Sequence, compiled) -> None:
        self.matchers[seq.seq_id] = (seq, self.backend.matcher(compiled))

    @property
    def num_active(self) -> int:
        return len(self.matchers)

    def prune(self) -> None:
        """Drops the matchers of sequences that ended (finished, aborted, failed)."""
        for seq_id in [i for i, (seq, _) in self.matchers.items() if seq.is_finished]:
            del self.matchers[seq_id]

    def bitmask(self, sampling: list[ScheduledSeq]) -> tuple[list[int], torch.Tensor] | None:
        """(sampled rows that are constrained, their int32 bitmasks [R, ceil(V / 32)]) for a step whose
        sampled rows are `sampling`'s, each sequence's 1 + len(drafts) rows in order; None if no row is."""
        rows, entries, row = [], [], 0
        for s in sampling:
            n = s.num_sampled_rows
            if s.seq.seq_id in self.matchers and not self.matchers[s.seq.seq_id][1].is_terminated():
                rows += range(row, row + n)
                entries.append((s, n))
            row += n
        if not rows:
            return None
        mask = self.backend.bitmask(len(rows))
        plain_rows, plain_matchers = [], []  # one row each: filled in one call, over threads
        r = 0
        for s, n in entries:
            matcher = self.matchers[s.seq.seq_id][1]
            if n == 1:
                plain_rows.append(r)
                plain_matchers.append(matcher)
                r += 1
                continue
            advanced = 0
            for j in range(n):
                if advanced < j:  # an earlier draft broke the grammar: it is rejected, this row is unused
                    mask[r].fill_(-1)
                else:
                    matcher.fill_next_token_bitmask(mask, r)
                    if j < n - 1 and not matcher.is_terminated() and matcher.accept_token(s.draft_token_ids[j]):
                        advanced += 1
                r += 1
            if advanced:
                matcher.rollback(advanced)
        if plain_matchers:
            self.backend.fill_bitmasks(plain_matchers, mask, plain_rows)
        return rows, mask

    def accept(self, taken: list[tuple[Sequence, int, int]]) -> None:
        """Advances the matchers over the tokens the scheduler appended: (sequence, row, count) each."""
        for seq, _, n in taken:
            entry = self.matchers.get(seq.seq_id)
            if entry is None:
                continue
            matcher = entry[1]
            for token in seq.token_ids[len(seq.token_ids) - n :]:
                if matcher.is_terminated():  # its grammar ended on EOS and ignore_eos went on: unconstrained
                    del self.matchers[seq.seq_id]
                    break
                if not matcher.accept_token(token):
                    # only a token the mask allowed is sampled; min_tokens banning the only allowed EOS,
                    # or an all-masked row, can break that. The sequence goes on unconstrained.
                    logger.warning("sequence of %s left its grammar at token %d", seq.request_id, token)
                    del self.matchers[seq.seq_id]
                    break
        self.prune()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
