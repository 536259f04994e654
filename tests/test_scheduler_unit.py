"""Scheduler.schedule() on its own: a fake block manager, no model, no engine.

The fake counts blocks as BlockManager does (ceil(tokens / block_size) a sequence) and caches nothing
unless a test says so, so each test decides when the KV pool runs dry. The tests read what a step
schedules and who is preempted, not how the scheduler gets there; `make_scheduler` and `run_step` are
the only places that know how a scheduler is built and how a step's results come back to it.
"""

from __future__ import annotations

from mini_infer.config import EngineConfig
from mini_infer.sampling_params import SamplingParams
from mini_infer.scheduler import Scheduler, SchedulerOutput
from mini_infer.sequence import Sequence, SequenceStatus

BLOCK = 16


class FakeBlockManager:
    """A pool of `num_blocks` blocks. `cached[request_id]` blocks of a prompt count as found in the prefix
    cache; like BlockManager's, they come out of the free pool when a sequence takes them. Requests are
    told apart by their prompts' first token (`add` makes it the request's number)."""

    def __init__(self, num_blocks: int, cached: dict[str, int] | None = None) -> None:
        self.block_size = BLOCK
        self.num_blocks = num_blocks
        self.free_ids = list(range(num_blocks))
        self.cached = cached or {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // BLOCK)

    def match_prefix(self, token_ids: list[int], root: int | None = None) -> tuple[list[int], list[int]]:
        hits = min(self.cached.get(NAMES[token_ids[0]], 0), len(self.free_ids), (len(token_ids) - 1) // BLOCK)
        return [self.free_ids.pop() for _ in range(hits)], []

    def record_lookup(self, num_tokens: int, num_hits: int) -> None:
        pass

    def cache_full_blocks(self, token_ids, block_table, block_hashes, num_tokens: int, root=None) -> list[int]:
        return []

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > len(self.free_ids):
            return None
        return [self.free_ids.pop() for _ in range(num_blocks)]

    def free(self, block_table: list[int]) -> None:
        self.free_ids += block_table


NAMES: dict[int, str] = {}


def make_scheduler(
    num_blocks: int = 1000, cached: dict[str, int] | None = None, **config
) -> tuple[Scheduler, FakeBlockManager]:
    block_manager = FakeBlockManager(num_blocks, cached)
    return Scheduler(EngineConfig(model="unit-test", block_size=BLOCK, **config), block_manager, 10**6), block_manager


def add(
    scheduler: Scheduler, name: str, prompt_len: int, max_tokens: int = 100, priority: int = 0, arrival: float = 0.0
) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    first = len(NAMES) + 1000
    NAMES[first] = name
    seq = Sequence(name, 0, [first, *range(prompt_len - 1)], params, priority, arrival_time=arrival)
    scheduler.add(seq)
    return seq


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    """One synchronous engine step: schedule, mark the tokens computed, append a token to every sequence
    whose chunk reached its end, finish those at max_tokens."""
    out = scheduler.schedule()
    scheduler.update_from_output(out, [7] * len(out.sampling))
    return out


def tokens(out: SchedulerOutput) -> dict[str, int]:
    return {s.seq.request_id: s.num_new_tokens for s in out.seqs}


def test_a_step_spends_its_token_budget_on_running_sequences_first():
    scheduler, _ = make_scheduler(max_num_batched_tokens=10)
    add(scheduler, "a", 4, arrival=0)
    add(scheduler, "b", 4, arrival=1)
    long = add(scheduler, "long", 30, arrival=2)
    assert tokens(run_step(scheduler)) == {"a": 4, "b": 4, "long": 2}  # the rest of the budget: a chunk
    for _ in range(3):
        assert tokens(run_step(scheduler)) == {"a": 1, "b": 1, "long": 8}
        assert long.num_output_tokens == 0
    assert tokens(run_step(scheduler)) == {"a": 1, "b": 1, "long": 4}
    assert long.num_output_tokens == 1


def test_chunked_prefill_samples_only_at_the_end_of_the_prompt():
    scheduler, _ = make_scheduler(max_num_batched_tokens=16)
    a = add(scheduler, "a", 40)
    chunks = []
    for _ in range(3):
        out = run_step(scheduler)
        assert not out.decodes
        chunks += [(s.num_new_tokens, a.num_output_tokens) for s in out.prefills]
    assert chunks == [(16, 0), (16, 0), (8, 1)]
    out = run_step(scheduler)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.decodes] == [("a", 1)] and not out.prefills


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_whole():
    scheduler, _ = make_scheduler(max_num_batched_tokens=10, enable_chunked_prefill=False)
    add(scheduler, "a", 6, arrival=0)
    b = add(scheduler, "b", 6, arrival=1)
    assert tokens(run_step(scheduler)) == {"a": 6}
    assert b.status == SequenceStatus.WAITING
    assert tokens(run_step(scheduler)) == {"a": 1, "b": 6}


def test_waiting_sequences_are_admitted_by_priority_then_arrival():
    scheduler, _ = make_scheduler(max_num_seqs=1)
    for name, priority, arrival in (("low", 5, 0), ("high", 0, 1), ("mid", 2, 2), ("high-later", 0, 3)):
        add(scheduler, name, 4, max_tokens=1, priority=priority, arrival=arrival)
    admitted = []
    while scheduler.waiting or scheduler.running:
        out = run_step(scheduler)
        assert len(out.seqs) == 1
        admitted += [s.seq.request_id for s in out.prefills]
    assert admitted == ["high", "high-later", "mid", "low"]


def test_running_sequences_never_exceed_max_num_seqs():
    scheduler, _ = make_scheduler(max_num_seqs=2)
    for i in range(3):
        add(scheduler, f"r{i}", 4, max_tokens=2, arrival=i)
    assert tokens(run_step(scheduler)) == {"r0": 4, "r1": 4}
    assert tokens(run_step(scheduler)) == {"r0": 1, "r1": 1}  # both finish on this token
    assert tokens(run_step(scheduler)) == {"r2": 4}


def test_decodes_come_longest_context_first():
    scheduler, _ = make_scheduler()
    for name, prompt_len in (("short", 5), ("longest", 30), ("middle", 12)):
        add(scheduler, name, prompt_len)
    run_step(scheduler)
    out = run_step(scheduler)
    assert [s.seq.request_id for s in out.decodes] == ["longest", "middle", "short"]


def _three_decoding(num_blocks: int) -> tuple[Scheduler, FakeBlockManager, dict[str, Sequence]]:
    """a (priority 0, first), b (priority 1, second), c (priority 0, last), each a one-block prompt that
    is prefilled; each one's next decode needs a second block."""
    scheduler, block_manager = make_scheduler(num_blocks)
    seqs = {
        name: add(scheduler, name, BLOCK, max_tokens=3, priority=priority, arrival=arrival)
        for name, priority, arrival in (("a", 0, 0), ("b", 1, 1), ("c", 0, 2))
    }
    assert tokens(run_step(scheduler)) == {"a": BLOCK, "b": BLOCK, "c": BLOCK}
    return scheduler, block_manager, seqs


def test_out_of_blocks_preempts_the_lowest_priority_first():
    scheduler, _, seqs = _three_decoding(num_blocks=4)  # one block to spare: one sequence must go
    assert tokens(run_step(scheduler)) == {"a": 1, "c": 1}  # b arrived before c but has the lower priority
    assert scheduler.num_preemptions == 1
    assert seqs["b"].status == SequenceStatus.WAITING and not seqs["b"].block_table


def test_out_of_blocks_preempts_the_latest_arrival_among_equal_priorities():
    scheduler, block_manager, seqs = _three_decoding(num_blocks=3)  # no block to spare: two must go
    assert tokens(run_step(scheduler)) == {"a": 1}
    assert scheduler.num_preemptions == 2
    assert all(seqs[name].status == SequenceStatus.WAITING and not seqs[name].block_table for name in "bc")
    # a finishes on its next token and frees its blocks; c (priority 0) is readmitted before b and
    # recomputes its prompt and the token it had generated
    assert tokens(run_step(scheduler)) == {"a": 1}
    assert seqs["a"].is_finished and block_manager.num_free_blocks == 3
    assert tokens(run_step(scheduler)) == {"c": BLOCK + 1}
    assert seqs["c"].num_output_tokens == 2 and seqs["b"].status == SequenceStatus.WAITING


def test_a_waiting_sequence_does_not_pin_cached_blocks():
    scheduler, block_manager = make_scheduler(num_blocks=4, cached={"w": 2})
    add(scheduler, "r", 20, arrival=0)  # two blocks, room to decode
    assert tokens(run_step(scheduler)) == {"r": 20}
    w = add(scheduler, "w", 3 * BLOCK, arrival=1)  # two cached blocks; its last block does not fit
    assert tokens(run_step(scheduler)) == {"r": 1}
    assert w.status == SequenceStatus.WAITING
    assert not w.block_table and block_manager.num_free_blocks == 2


def test_a_finished_sequence_frees_its_blocks():
    scheduler, block_manager = make_scheduler(num_blocks=8)
    a = add(scheduler, "a", 40, max_tokens=2)
    run_step(scheduler)
    assert block_manager.num_free_blocks == 5
    run_step(scheduler)
    assert a.is_finished and block_manager.num_free_blocks == 8
    assert not scheduler.schedule()
