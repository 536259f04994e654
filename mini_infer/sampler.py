"""Batched sampling on the device: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

One call handles the whole batch. Rows that are greedy take the argmax; the others draw with
the exponential-race trick (argmax of p / q with q ~ Exp(1)), which needs no multinomial call
and lets a seeded row draw its noise from its own generator, so its tokens do not depend on
what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mini_infer.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row sampling inputs, already on the device."""

    temperature: torch.Tensor  # [N] float32, 0 for greedy rows
    top_k: torch.Tensor | None  # [N] int64, vocab size where off
    top_p: torch.Tensor | None  # [N] float32
    min_p: torch.Tensor | None  # [N] float32
    penalties: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # presence, frequency, repetition
    output_counts: torch.Tensor | None  # [N, V] counts of generated tokens
    prompt_mask: torch.Tensor | None  # [N, V] True where the token appears in the prompt
    banned: list[tuple[int, list[int]]]  # (row, ids masked out: EOS before min_tokens)
    generators: list[torch.Generator | None]  # per row: a seeded generator or None
    all_greedy: bool
    max_logprobs: int  # 0 = none asked for; else top-N to return


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row, when logprobs were asked for: (sampled logprob, sampled rank, top ids, top logprobs)
    logprobs: list[tuple[float, int, list[int], list[float]]] | None


def build_sampling_batch(
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    generators: list[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
) -> SamplingBatch:
    n = len(params)
    temperature = torch.tensor([0.0 if p.greedy else p.temperature for p in params], device=device)
    need_top_k = any(p.top_k > 0 for p in params)
    need_top_p = any(p.top_p < 1.0 for p in params)
    need_min_p = any(p.min_p > 0 for p in params)
    need_penalty = any(
        p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params
    )
    penalties = output_counts = prompt_mask = None
    if need_penalty:
        penalties = (
            torch.tensor([p.presence_penalty for p in params], device=device),
            torch.tensor([p.frequency_penalty for p in params], device=device),
            torch.tensor([p.repetition_penalty for p in params], device=device),
        )
        output_counts = torch.zeros(n, vocab_size, device=device)
        prompt_mask = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
        for i, (pids, oids) in enumerate(zip(prompt_ids, output_ids)):
            if oids:
                ids = torch.tensor(oids, device=device)
                output_counts[i].index_add_(0, ids, torch.ones(len(oids), device=device))
            prompt_mask[i, torch.tensor(pids, device=device)] = True
    banned = []
    for i, (p, oids) in enumerate(zip(params, output_ids)):
        if len(oids) < p.min_tokens:
            ids = sorted(({*p.eos_token_ids} if not p.ignore_eos else set()) | set(p.stop_token_ids))
            if ids:
                banned.append((i, ids))
    return SamplingBatch(
        temperature=temperature,
        top_k=torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=device)
        if need_top_k else None,
        top_p=torch.tensor([p.top_p for p in params], device=device) if need_top_p else None,
        min_p=torch.tensor([p.min_p for p in params], device=device) if need_min_p else None,
        penalties=penalties,
        output_counts=output_counts,
        prompt_mask=prompt_mask,
        banned=banned,
        generators=generators,
        all_greedy=all(p.greedy for p in params),
        max_logprobs=max((p.logprobs or 0) + 1 if p.logprobs is not None else 0 for p in params),
    )


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """vLLM's semantics: repetition over prompt and output tokens (divide positive logits,
    multiply negative ones); presence and frequency over generated tokens only."""
    presence, frequency, repetition = b.penalties
    seen = b.prompt_mask | (b.output_counts > 0)
    rep = repetition.unsqueeze(1).expand_as(logits)
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, scaled, logits)
    logits = logits - frequency.unsqueeze(1) * b.output_counts
    return logits - presence.unsqueeze(1) * (b.output_counts > 0).float()


def filter_top_k_top_p_min_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Masks (to -inf) tokens outside each row's top-k, nucleus and min-p sets."""
    if b.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = b.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if b.top_k is None and b.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if b.top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
        drop |= ranks >= b.top_k.unsqueeze(1)
    if b.top_p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # keep a token while the mass before it < p
        drop |= mass_before >= b.top_p.unsqueeze(1)
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits: [N, V] float32 for the rows that sample this step."""
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1) if b.max_logprobs else None
    if b.penalties is not None:
        logits = apply_penalties(logits, b)
    for row, ids in b.banned:
        logits[row, ids] = float("-inf")
    greedy_tokens = logits.argmax(dim=-1)
    if b.all_greedy:
        tokens = greedy_tokens
    else:
        temperature = b.temperature.clamp(min=1e-5).unsqueeze(1)
        probs = filter_top_k_top_p_min_p(logits / temperature, b).softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(b.generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
        random_tokens = (probs / noise).argmax(dim=-1)
        tokens = torch.where(b.temperature == 0, greedy_tokens, random_tokens)
    if raw_logprobs is None:
        return SamplerOutput(tokens.tolist(), None)
    sampled = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ranks = (raw_logprobs > sampled.unsqueeze(1)).sum(dim=-1) + 1
    top_values, top_ids = raw_logprobs.topk(b.max_logprobs - 1, dim=-1) if b.max_logprobs > 1 else (
        raw_logprobs[:, :0], tokens[:, None][:, :0])
    rows = zip(sampled.tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist())
    return SamplerOutput(tokens.tolist(), list(rows))
