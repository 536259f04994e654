"""Rejection sampling: verifies a sequence's draft tokens against the target's distributions, so the tokens
it emits are distributed exactly as the target would sample them one at a time.

A verified sequence has k draft tokens d_1..d_k and k + 1 rows of target logits: row j is the target's
distribution p_j for the token after d_j (row 0: after the sequence's last token). Greedy rows accept d_j
while it is row j-1's argmax. Sampled rows accept d_j with probability min(1, p(d_j) / q(d_j)), where q is
the draft's distribution (one-hot for n-gram drafts); at the first rejection the token is drawn from the
residual max(p - q, 0), normalised; when all k are accepted the last row gives a bonus token. Every row
is a token position, so it gets that position's sampling inputs: its logits processors see the drafts
before it as generated tokens, and a seeded request's row draws from hash(seed, sample, position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mini_infer.sampler import (
    SamplingBatch,
    exponential_noise,
    process_logits,
    target_probs,
    with_logprobs,
)


@dataclass
class Verified:
    """Per verified sequence, the tokens it emits (accepted drafts, then one more), and when logprobs are
    asked for, (logprob, rank, top ids, top logprobs) of each of them."""

    token_ids: list[list[int]]
    logprobs: list[list[tuple]] | None
    num_accepted: list[int]


def rejection_sample(
    logits: torch.Tensor, batch: SamplingBatch, drafts: list[list[int]], draft_probs: list[torch.Tensor | None]
) -> Verified:
    """logits: [sum(k_i + 1), V], sequence i's k_i + 1 rows together; batch: one row per logits row (a
    seeded row's generator draws its acceptance uniform, then its residual noise). draft_probs[i]:
    [k_i, V], the draft's distributions, or None (one-hot: n-gram drafts)."""
    logits, raw_logprobs = process_logits(logits, batch)
    greedy = logits.argmax(dim=-1)
    probs = None if batch.all_greedy else target_probs(logits, batch)
    device = logits.device
    uniforms = torch.rand(len(logits), device=device)
    draft_rows = {row0 + j for row0, seq_drafts in zip(_row_starts(drafts), drafts) for j in range(len(seq_drafts))}
    for row, gen in enumerate(batch.generators):
        if gen is not None and row in draft_rows:  # a bonus row draws only its noise, as plain sampling does
            uniforms[row] = torch.rand((), generator=gen, device=device)
    accept_probs = residual_tokens = None
    if probs is not None:
        accept_probs, residual_tokens = _acceptance(probs, drafts, draft_probs, batch.generators)
    greedy_rows = (batch.temperature == 0).tolist()
    greedy_list = greedy.tolist()
    accept = accept_probs.tolist() if accept_probs is not None else None
    residual = residual_tokens.tolist() if residual_tokens is not None else None
    uniform = uniforms.tolist()
    tokens, accepted, rows_used, row0 = [], [], [], 0
    for seq_drafts in drafts:
        k = len(seq_drafts)
        out = []
        for j in range(k + 1):
            row = row0 + j
            if greedy_rows[row]:
                if j < k and seq_drafts[j] == greedy_list[row]:
                    out.append(seq_drafts[j])
                    continue
                out.append(greedy_list[row])
                break
            if j < k and uniform[row] < accept[row]:
                out.append(seq_drafts[j])
                continue
            out.append(residual[row])  # the residual at a rejection, the target itself at the bonus row
            break
        tokens.append(out)
        accepted.append(len(out) - 1)
        rows_used.append(list(range(row0, row0 + len(out))))
        row0 += k + 1
    logprobs = None
    if raw_logprobs is not None:
        flat_rows = [r for rows in rows_used for r in rows]
        flat_tokens = torch.tensor([t for out in tokens for t in out], device=device)
        index = torch.tensor(flat_rows, device=device)
        sample = with_logprobs(flat_tokens, raw_logprobs[index], batch)
        values = list(zip(*(t.tolist() for t in sample.logprobs)))
        logprobs, start = [], 0
        for out in tokens:
            logprobs.append(values[start : start + len(out)])
            start += len(out)
    return Verified(tokens, logprobs, accepted)


def _row_starts(drafts: list[list[int]]) -> list[int]:
    starts, row = [], 0
    for seq_drafts in drafts:
        starts.append(row)
        row += len(seq_drafts) + 1
    return starts


def _acceptance(
    probs: torch.Tensor,
    drafts: list[list[int]],
    draft_probs: list[torch.Tensor | None],
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the probability of accepting the draft the row verifies (min(1, p/q); 0 at a bonus row)
    and the token drawn where the row rejects (from max(p - q, 0); at a bonus row, from p)."""
    device = probs.device
    rows, draft_tokens, q_rows = [], [], []
    row0 = 0
    for seq_drafts, q in zip(drafts, draft_probs):
        for j, token in enumerate(seq_drafts):
            rows.append(row0 + j)
            draft_tokens.append(token)
            q_rows.append(q[j] if q is not None else None)
        row0 += len(seq_drafts) + 1
    residual = probs.clone()
    accept = torch.zeros(len(probs), device=device)
    if rows:
        index = torch.tensor(rows, device=device)
        tokens = torch.tensor(draft_tokens, device=device)
        q = torch.zeros(len(rows), probs.shape[1], device=device)
        q[torch.arange(len(rows), device=device), tokens] = 1.0  # one-hot where the draft has no distribution
        for i, row_q in enumerate(q_rows):
            if row_q is not None:
                q[i] = row_q
        p = probs[index]
        p_draft = p.gather(1, tokens[:, None]).squeeze(1)
        q_draft = q.gather(1, tokens[:, None]).squeeze(1)
        accept[index] = torch.clamp(p_draft / q_draft, max=1.0)
        left = torch.clamp(p - q, min=0.0)
        empty = left.sum(dim=-1, keepdim=True) <= 0  # p == q: nothing is left, and no rejection can happen
        residual[index] = torch.where(empty, p, left)
    return accept, (residual / exponential_noise(residual, generators)).argmax(dim=-1)
