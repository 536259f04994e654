"""Batched sampling on the device: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

One call handles the whole batch. Rows that are greedy take the argmax; the others draw with
the exponential-race trick (argmax of p / q with q ~ Exp(1)), which needs no multinomial call
and lets a seeded row draw its noise from its own generator, so its tokens do not depend on
what else is in the batch. On CUDA, a batch with no top-k/top-p/min-p takes the fused kernel in
kernels/sampling.py instead (the same distribution by the Gumbel-max trick, one read of the logits),
with a per-row Philox seed: derived from the request's seed and position when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mini_infer.kernels._triton import HAS_TRITON
from mini_infer.kernels.sampling import sample_tokens_triton
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
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, token ids, biases
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # rows with allowed_token_ids, [R, V] True where not allowed
    grammar_bitmask: tuple[torch.Tensor, torch.Tensor] | None  # rows, int32 [R, ceil(V/32)] (structured outputs)
    generators: list[torch.Generator | None]  # per row: a seeded generator or None
    seeds: torch.Tensor | None  # [N] int64 Philox seeds for the fused kernel (CUDA), None elsewhere
    all_greedy: bool
    max_logprobs: int  # 0 = none asked for; else top-N to return


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row, when logprobs were asked for: (sampled logprob, sampled rank, top ids, top logprobs)
    logprobs: list[tuple[float, int, list[int], list[float]]] | None
    # per sequence id, when prompt logprobs were asked for: (first position, the same tuples per position)
    prompt_logprobs: dict[int, tuple[int, list]] = field(default_factory=dict)


@dataclass
class DeviceSample:
    """What sampling leaves on the device, before anything is read back: the engine copies it to the
    host without blocking and reads it one step later."""

    tokens: torch.Tensor  # [N] int64
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # sampled, rank, top ids/values

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, *(self.logprobs or ())]

    @staticmethod
    def to_output(tensors: list[torch.Tensor]) -> SamplerOutput:
        """SamplerOutput from `tensors()` (or host copies of them)."""
        tokens = tensors[0].tolist()
        if len(tensors) == 1:
            return SamplerOutput(tokens, None)
        sampled, ranks, top_ids, top_values = (t.tolist() for t in tensors[1:])
        return SamplerOutput(tokens, list(zip(sampled, ranks, top_ids, top_values)))


def to_device(values: list | np.ndarray, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A host list/array on the device without a stream sync: a copy from pageable memory would wait for
    all queued GPU work, so CUDA copies go through pinned memory, non-blocking. dtype None keeps the array's."""
    t = torch.as_tensor(np.asarray(values), dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def build_sampling_batch(
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    generators: list[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
    num_outputs: list[int] | None = None,
    seeds: list[int] | None = None,
    grammar_bitmask: tuple[list[int], torch.Tensor] | None = None,
) -> SamplingBatch:
    """num_outputs: tokens generated so far per row, where the host has not read them all (async steps);
    defaults to len(output_ids). seeds: per-row seeds for the fused CUDA kernel (see `sample_on_device`).
    grammar_bitmask: (rows, host int32 bitmasks) of the rows a grammar constrains (structured_output/)."""
    n = len(params)
    temperature = to_device([0.0 if p.greedy else p.temperature for p in params], torch.float32, device)
    need_top_k = any(p.top_k > 0 for p in params)
    need_top_p = any(p.top_p < 1.0 for p in params)
    need_min_p = any(p.min_p > 0 for p in params)
    need_penalty = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params)
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
    counts = num_outputs if num_outputs is not None else [len(o) for o in output_ids]
    for i, (p, count) in enumerate(zip(params, counts)):
        if count < p.min_tokens:
            ids = sorted(({*p.eos_token_ids} if not p.ignore_eos else set()) | set(p.stop_token_ids))
            if ids:
                banned.append((i, ids))
    bias = [(i, t, v) for i, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
    logit_bias = None
    if bias:
        rows, cols, values = zip(*bias)
        logit_bias = (
            to_device(rows, torch.int64, device),
            to_device(cols, torch.int64, device),
            to_device(values, torch.float32, device),
        )
    allowed = None
    allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if allowed_rows:
        disallowed = torch.ones(len(allowed_rows), vocab_size, dtype=torch.bool)
        for r, i in enumerate(allowed_rows):
            disallowed[r, list(params[i].allowed_token_ids)] = False
        allowed = (to_device(allowed_rows, torch.int64, device), disallowed.to(device))
    return SamplingBatch(
        temperature=temperature,
        top_k=to_device([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64, device)
        if need_top_k
        else None,
        top_p=to_device([p.top_p for p in params], torch.float32, device) if need_top_p else None,
        min_p=to_device([p.min_p for p in params], torch.float32, device) if need_min_p else None,
        penalties=penalties,
        output_counts=output_counts,
        prompt_mask=prompt_mask,
        banned=banned,
        logit_bias=logit_bias,
        allowed=allowed,
        grammar_bitmask=(
            (to_device(grammar_bitmask[0], torch.int64, device), to_device(grammar_bitmask[1].numpy(), None, device))
            if grammar_bitmask is not None
            else None
        ),
        generators=generators,
        seeds=to_device(seeds, torch.int64, device) if seeds is not None else None,
        all_greedy=all(p.greedy for p in params),
        max_logprobs=max((p.logprobs or 0) + 1 if p.logprobs is not None else 0 for p in params),
    )


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where a row's grammar forbids the token: bit (t % 32) of word t // 32 is 1 where t is allowed.
    Unpacked and applied on the device for all constrained rows at once (no per-row host work)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : logits.shape[-1]].bool()
    return logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))


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
    """logits: [N, V] for the rows that sample this step; reads the result back to the host."""
    return DeviceSample.to_output(sample_on_device(logits, b).tensors())


def sample_on_device(logits: torch.Tensor, b: SamplingBatch) -> DeviceSample:
    """Samples every row without a host sync; the result stays on the device."""
    fused = (
        b.seeds is not None
        and HAS_TRITON
        and logits.is_cuda
        and b.top_k is None
        and b.top_p is None
        and b.min_p is None
    )
    plain = (
        b.penalties is None
        and not b.banned
        and b.logit_bias is None
        and b.allowed is None
        and b.grammar_bitmask is None
    )
    if fused and plain and not b.max_logprobs:  # straight from bf16 logits
        return DeviceSample(sample_tokens_triton(logits, b.temperature, b.seeds), None)
    logits, raw_logprobs = process_logits(logits, b)
    if fused:  # one read of the logits instead of ~7 torch passes
        tokens = sample_tokens_triton(logits, b.temperature, b.seeds)
        return with_logprobs(tokens, raw_logprobs, b)
    greedy_tokens = logits.argmax(dim=-1)
    if b.all_greedy:
        tokens = greedy_tokens
    else:
        probs = target_probs(logits, b)
        random_tokens = (probs / exponential_noise(probs, b.generators)).argmax(dim=-1)
        tokens = torch.where(b.temperature == 0, greedy_tokens, random_tokens)
    return with_logprobs(tokens, raw_logprobs, b)


def process_logits(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits after the logits processors, in vLLM's order (allowed tokens, min_tokens' banned
    stops, logit bias, penalties), and the raw log-softmax when logprobs are asked for. A grammar's bitmask
    goes first, as in vLLM (the logprobs stay the model's)."""
    logits = logits.float()
    raw_logprobs = logits.log_softmax(dim=-1) if b.max_logprobs else None
    if b.grammar_bitmask is not None:
        logits = apply_token_bitmask(logits, *b.grammar_bitmask)
    if b.allowed is not None:
        rows, disallowed = b.allowed
        logits = logits.index_put((rows,), logits[rows].masked_fill(disallowed, float("-inf")))
    if b.banned:
        rows = [row for row, ids in b.banned for _ in ids]
        cols = [i for _, ids in b.banned for i in ids]
        index = (to_device(rows, torch.int64, logits.device), to_device(cols, torch.int64, logits.device))
        logits = logits.index_put(index, logits.new_full((), float("-inf")))
    if b.logit_bias is not None:
        rows, cols, values = b.logit_bias
        logits = logits.index_put((rows, cols), values, accumulate=True)
    if b.penalties is not None:
        logits = apply_penalties(logits, b)
    return logits, raw_logprobs


def target_probs(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """The distribution each row samples from: processed logits over the temperature, then top-k, top-p
    and min-p."""
    temperature = b.temperature.clamp(min=1e-5).unsqueeze(1)
    return filter_top_k_top_p_min_p(logits / temperature, b).softmax(dim=-1)


def exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Exp(1) noise for the exponential race (argmax of p / noise draws from p); a seeded row draws its own.
    Drawn as -log(U) with U uniform in [0, 1): the same distribution as `exponential_`, which on a CPU
    costs 4x as much (171 against 40 us for 16 rows of 512). Never 0 (U = 0 gives inf, which only takes
    that token out of the race), so no p / 0 makes a forbidden token's 0 / 0 a NaN that argmax would pick."""
    uniform = torch.rand_like(probs)
    for row, gen in enumerate(generators):
        if gen is not None:
            uniform[row].uniform_(generator=gen)
    return uniform.log_().neg_()


def with_logprobs(tokens: torch.Tensor, raw_logprobs: torch.Tensor | None, b: SamplingBatch) -> DeviceSample:
    if raw_logprobs is None:
        return DeviceSample(tokens, None)
    sampled = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ranks = (raw_logprobs > sampled.unsqueeze(1)).sum(dim=-1) + 1
    top_values, top_ids = (
        raw_logprobs.topk(b.max_logprobs - 1, dim=-1)
        if b.max_logprobs > 1
        else (raw_logprobs[:, :0], tokens[:, None][:, :0])
    )
    return DeviceSample(tokens, (sampled, ranks, top_ids, top_values))
