"""CUDA graphs: forward passes captured by size over static buffers and replayed on new inputs.

Launching the ~15 kernels of each layer one by one from Python costs more host time than a small
step's GPU work, so on CUDA a step replays graphs: decode batches by batch size, prefill chunks by
token count (padded up to the next captured size), and a step that mixes both replays one of each.
Inputs reach a graph through the same `put(name, array)` the eager path uses: at capture it makes
the static buffer, at replay it copies the step's array into a pinned staging buffer and from there,
without blocking, into the static one. Off CUDA (tests of this path) a "graph" runs the same forward
eagerly over the same buffers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from mini_infer.worker.step_inputs import StepInputs

if TYPE_CHECKING:
    from mini_infer.worker.model_runner import ModelRunner

# Larger prefill steps run eagerly: their GPU work dwarfs the launch cost, and each captured size costs
# capture time at startup.
PREFILL_GRAPH_MAX_TOKENS = 8192


def _corner(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, d) for d in shape)


class GraphSet:
    """The graphs of one kind (decode or prefill), one per size, over one set of static buffers."""

    def __init__(
        self, runner: ModelRunner, sizes: list[int], shape: Callable[[int], tuple[int, int]], decode: bool
    ) -> None:
        """shape(size) = (tokens, sequences) of the padded batch a graph of that size runs; decode: its
        sequences have one query token each. The runner owns the graphs; the reference back to it is weak,
        so a dropped engine has no reference cycle and frees its GPU memory at once."""
        self.runner, self.sizes, self.shape, self.is_decode = weakref.proxy(runner), sorted(sizes), shape, decode
        self.buffers: dict[str, torch.Tensor] = {}
        self.staging: list[dict[str, torch.Tensor]] = [{}, {}]  # filled by turns: a copy may still be queued
        self.replays: dict[int, Callable[[], torch.Tensor]] = {}
        self.num_replays = 0

    def size_for(self, num: int) -> int | None:
        return next((s for s in self.sizes if s >= num), None)

    def capture(self, pool: object) -> object:
        """Records every size, largest first (it makes the buffers), in the shared memory pool."""
        max_blocks = -(-self.runner.max_model_len // self.runner.block_size)
        for size in reversed(self.sizes):
            num_tokens, num_seqs = self.shape(size)
            dummy = StepInputs(
                token_ids=np.zeros(num_tokens, np.int64),
                positions=np.zeros(num_tokens, np.int64),
                slot_mapping=np.full(num_tokens, -1, np.int64),
                query_lens=np.zeros(num_seqs, np.int64),
                seq_lens=np.zeros(num_seqs, np.int64),
                block_tables=np.zeros((num_seqs, max_blocks), np.int32),
                num_decodes=num_seqs if self.is_decode else 0,
                logits_indices=np.zeros(0, np.int64),
                pending=np.zeros((0, 2), np.int64),
            )
            ids, positions, meta = self.runner.prepare(dummy, self._make_buffer)
            self.replays[size], pool = self.runner.record(meta, ids, positions, pool)
        return pool

    def _make_buffer(self, name: str, array: np.ndarray) -> torch.Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.from_numpy(array).to(self.runner.device)
        return self.buffers[name][_corner(array.shape)]

    def _stage(self, name: str, array: np.ndarray) -> torch.Tensor:
        """Copies a step's array into its buffer's leading corner (block tables are not padded: padding
        rows read none of theirs) and returns the buffer view the graph was captured with."""
        buffer = self.buffers[name]
        stage = self.staging[self.num_replays % 2]
        if name not in stage:
            stage[name] = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=buffer.is_cuda)
        corner = _corner(array.shape)
        stage[name].numpy()[corner] = array
        buffer[corner].copy_(stage[name][corner], non_blocking=True)
        return buffer[corner]

    def replay(self, inputs: StepInputs, size: int) -> torch.Tensor:
        """Hidden states of inputs' tokens, from the graph of `size`."""
        num_tokens, num_seqs = self.shape(size)
        self.runner.prepare(inputs.padded(num_tokens, num_seqs), self._stage)
        self.num_replays += 1
        return self.replays[size]()[: inputs.num_tokens]


class CUDAGraphs:
    """Decode graphs by rows (batch size, or 1 + k per sequence when speculating) and prefill graphs by
    token count, sharing one memory pool."""

    def __init__(self, runner: ModelRunner) -> None:
        config = runner.config
        self.runner = weakref.proxy(runner)
        self.max_batch = config.max_decode_rows
        sizes = [b for b in (1, 2, 4) if b < self.max_batch] + list(range(8, self.max_batch, 8)) + [self.max_batch]
        self.decode = GraphSet(runner, sorted(set(sizes)), lambda b: (b, b), decode=True)
        self.max_prefill_seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        top = min(config.max_num_batched_tokens, PREFILL_GRAPH_MAX_TOKENS)
        # powers of two to 512, then every 512: padding wastes at most half a small chunk, 511 tokens of a large one
        sizes = [t for t in (16, 32, 64, 128, 256) if t < top] + list(range(512, top, 512)) + [top]
        seqs = self.max_prefill_seqs  # (not self in the lambda: that would be a reference cycle)
        self.prefill = GraphSet(
            runner, sorted(set(sizes)) if config.cuda_graph_prefill else [], lambda t: (t, seqs), decode=False
        )

    def capture(self) -> None:
        pool = self.decode.capture(None)
        self.prefill.capture(pool)

    def can_run(self, num_decodes: int, prefills: list, max_table: int) -> bool:
        """Whether graphs hold this batch: its decodes and its prefill chunks (token count, chunk count)."""
        if num_decodes > self.max_batch or max_table > -(-self.runner.max_model_len // self.runner.block_size):
            return False
        if not prefills:
            return True
        tokens = sum(s.num_new_tokens for s in prefills)
        return len(prefills) <= self.max_prefill_seqs and self.prefill.size_for(tokens) is not None
