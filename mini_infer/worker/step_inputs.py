"""StepInputs: everything one forward pass reads, built once per step on the host.

The batch is flat, with no padding: decodes first (one token each), then prefill chunks. A verify run
of speculative decoding (the last token and k drafts) is 1 + k decode rows of one sequence, row i with
the keys up to its own position: the decode kernel computes each as it computes a plain decode there,
and verify steps replay the decode graphs. Every
token's position and cache slot come from one formula (`slot = table[p // block_size] * block_size
+ p % block_size`). Only rows in `logits_indices` become logits. A token the previous step sampled
but the host has not read yet is 0 here and listed in `pending`; the runner copies it in on the device.
With LoRA each token also carries its adapter's device slot (-1: the base model).
Plain numpy arrays, so the inputs can be padded for a CUDA graph or sent to another rank as they are.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mini_infer.scheduler import ScheduledSeq

if TYPE_CHECKING:
    import torch


@dataclass
class StepInputs:
    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64, -1 = store nothing (padding)
    query_lens: np.ndarray  # [B] int64: this step's tokens per sequence (per row, for decode rows)
    seq_lens: np.ndarray  # [B] int64: keys per sequence after this step (cached + new)
    block_tables: np.ndarray  # [B, W] int32
    num_decodes: int  # the first num_decodes "sequences" are decode rows: one query token each
    logits_indices: np.ndarray  # [S] int64: rows whose hidden states are sampled (1 + drafts per verify)
    pending: np.ndarray  # [P, 2] int64: (row here, row of the previous step's sampled tokens)
    lora_slots: np.ndarray | None = None  # [T] int32: each token's adapter slot, -1 = none (enable_lora)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def uses_lora(self) -> bool:
        """Whether any token has an adapter: a step without one skips the LoRA kernels altogether."""
        return self.lora_slots is not None and bool((self.lora_slots >= 0).any())

    def padded(self, num_tokens: int, num_seqs: int) -> StepInputs:
        """The same step at a CUDA graph's size: padding tokens store nothing, padding sequences have no
        queries and no keys (block tables are not padded: padding rows read none of theirs)."""

        def pad(a: np.ndarray, n: int, value: int) -> np.ndarray:
            return np.concatenate((a, np.full(n - len(a), value, dtype=a.dtype))) if n > len(a) else a

        all_decodes = self.num_decodes == self.num_seqs  # a decode batch stays one (padding rows decode nothing)
        return replace(
            self,
            token_ids=pad(self.token_ids, num_tokens, 0),
            positions=pad(self.positions, num_tokens, 0),
            slot_mapping=pad(self.slot_mapping, num_tokens, -1),
            lora_slots=None if self.lora_slots is None else pad(self.lora_slots, num_tokens, -1),
            query_lens=pad(self.query_lens, num_seqs, 0),
            seq_lens=pad(self.seq_lens, num_seqs, 0),
            num_decodes=num_seqs if all_decodes else self.num_decodes,
        )

    def split(self) -> tuple[StepInputs, StepInputs]:
        """(the decode rows, the prefill chunks) of a mixed step, each as build_step_inputs lays out its part
        alone (rows renumbered from 0): the two parts replay a decode graph and a prefill graph."""
        nd = self.num_decodes  # decode rows: one token each, so rows and tokens split at the same index

        def part(start: int, stop: int, seqs: slice, num_decodes: int) -> StepInputs:
            kept = self.logits_indices[(self.logits_indices >= start) & (self.logits_indices < stop)]
            pending = self.pending[(self.pending[:, 0] >= start) & (self.pending[:, 0] < stop)]
            return StepInputs(
                token_ids=self.token_ids[start:stop],
                positions=self.positions[start:stop],
                slot_mapping=self.slot_mapping[start:stop],
                query_lens=self.query_lens[seqs],
                seq_lens=self.seq_lens[seqs],
                block_tables=self.block_tables[seqs],
                num_decodes=num_decodes,
                logits_indices=kept - start,
                pending=pending - np.array([start, 0], dtype=np.int64),
                lora_slots=None if self.lora_slots is None else self.lora_slots[start:stop],
            )

        return part(0, nd, slice(0, nd), nd), part(nd, self.num_tokens, slice(nd, None), 0)


class Forward(Protocol):
    """A model's forward pass over a step's inputs, as the runner hands it to a proposer: CUDA graph
    replays where graphs hold the inputs, eager otherwise (worker/cuda_graphs.py). device_inputs are
    inputs already on the device, one row per token: `input_ids` in place of inputs.token_ids (tokens
    the previous pass made), and the model's own (an EAGLE-3 head's `hidden`)."""

    def __call__(self, inputs: StepInputs, **device_inputs: torch.Tensor) -> Any: ...


def _ranges(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def build_step_inputs(
    seqs: list[ScheduledSeq],
    num_decodes: int,
    block_size: int,
    last_rows: dict[int, int],
    lora_slots: dict[int, int] | None = None,
) -> StepInputs:
    """num_decodes: how many of seqs (the first) decode, a verify run among them; last_rows: each
    sequence's row in the previous step's sampled tokens (for its pending input); lora_slots: adapter id
    -> device slot of the step's adapters (enable_lora), from LoRAModelManager.activate."""
    n = len(seqs)
    query_lens = np.fromiter((s.num_new_tokens for s in seqs), np.int64, n)
    starts = np.fromiter((s.start for s in seqs), np.int64, n)
    tables = np.zeros((n, max(len(s.seq.block_table) for s in seqs)), dtype=np.int32)
    ids: list[list[int]] = []
    pending: list[tuple[int, int]] = []
    offset = 0
    for i, s in enumerate(seqs):
        seq = s.seq
        tables[i, : len(seq.block_table)] = seq.block_table
        num_own = s.num_new_tokens - len(s.draft_token_ids)  # the chunk's own tokens, then its drafts
        known = seq.token_ids[s.start : s.start + num_own]
        if len(known) < num_own:  # only the last input can be pending: the token just sampled
            pending.append((offset + num_own - 1, last_rows[seq.seq_id]))
            known = [*known, 0]
        ids.append(known + s.draft_token_ids if s.draft_token_ids else known)
        offset += s.num_new_tokens
    ends = np.cumsum(query_lens)
    token_lora_slots = None
    if lora_slots is not None:
        seq_slots = np.fromiter((lora_slots.get(s.seq.lora_int_id, -1) for s in seqs), np.int32, n)
        token_lora_slots = np.repeat(seq_slots, query_lens)
    seq_of_token = np.repeat(np.arange(n), query_lens)
    positions = np.arange(offset) - np.repeat(ends - query_lens - starts, query_lens)
    slots = tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    sampled_rows = np.fromiter((s.num_sampled_rows for s in seqs), np.int64, n)  # the chunk's last rows
    seq_lens = starts + query_lens
    num_rows = num_decodes
    if query_lens[:num_decodes].max(initial=1) > 1:  # verify runs: one decode row per query
        rows = np.concatenate((query_lens[:num_decodes], np.ones(n - num_decodes, np.int64)))
        decode_rows = int(rows[:num_decodes].sum())
        seq_lens = np.repeat(seq_lens - query_lens, rows) + 1
        seq_lens[:decode_rows] += _ranges(rows[:num_decodes])
        seq_lens[decode_rows:] += query_lens[num_decodes:] - 1
        query_lens, tables, num_rows = np.repeat(query_lens, rows), np.repeat(tables, rows, axis=0), decode_rows
        query_lens[:decode_rows] = 1
    return StepInputs(
        token_ids=np.fromiter(itertools.chain.from_iterable(ids), np.int64, offset),
        positions=positions,
        slot_mapping=slots,
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=tables,
        num_decodes=num_rows,
        logits_indices=np.repeat(ends - sampled_rows, sampled_rows) + _ranges(sampled_rows),
        pending=np.array(pending, dtype=np.int64).reshape(-1, 2),
        lora_slots=token_lora_slots,
    )


def build_decode_rows(tokens: list[int], positions: list[int], seqs: list, block_size: int) -> StepInputs:
    """One decode row per (token, position) of seqs[i]'s sequence (keys up to its position): the passes a
    proposer's own model runs in the target's blocks (spec_decode/draft_model.py, eagle3.py)."""
    n = len(tokens)
    pos = np.asarray(positions, dtype=np.int64)
    tables = np.zeros((n, max(len(s.seq.block_table) for s in seqs)), dtype=np.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.seq.block_table)] = s.seq.block_table
    return StepInputs(
        token_ids=np.asarray(tokens, dtype=np.int64),
        positions=pos,
        slot_mapping=tables[np.arange(n), pos // block_size].astype(np.int64) * block_size + pos % block_size,
        query_lens=np.ones(n, np.int64),
        seq_lens=pos + 1,
        block_tables=tables,
        num_decodes=n,
        logits_indices=np.arange(n, dtype=np.int64),
        pending=np.zeros((0, 2), np.int64),
    )
