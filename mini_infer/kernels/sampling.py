"""Fused token sampling: greedy argmax and Gumbel-max sampling in one pass over the logits.

Sampling with torch reads and writes the [N, V] logits about seven times: a float copy, the divide by
temperature, the softmax, the noise draw, the divide by the noise, the argmax, and the where that picks
the greedy rows. The kernel reads each logit once. Greedy rows (temperature <= 0) keep a running argmax
of the logits; the others keep a running argmax of logits / temperature + g with Gumbel noise
g = -log(-log(u)), which picks token i with probability softmax(logits / temperature)[i] (the Gumbel-max
trick) without ever forming the softmax.

The uniforms come from Triton's counter-based Philox, tl.rand(seed, i), keyed by a per-row int64 seed
read from a tensor and counted by the vocabulary index i. A row's token thus depends only on its
logits, temperature and seed (not on the batch around it, the block size or the launch), and no
generator state lives on the host, so the launch needs no host sync and can sit in a CUDA graph.
Top-k, top-p, min-p and penalties are not handled here: rows that need them take the torch sampler.
"""

import torch

from mini_infer.kernels._triton import next_pow2, require_triton, tl, triton

# u is clamped into [U_MIN, U_MAX] before the two logs. Only an exact 0 falls under U_MIN (Triton's
# smallest nonzero draw is 2**-31), and U_MAX keeps -log(u) well clear of 0, where a fast approximate
# log could round it to 0 and make the noise infinite; the clamped mass (about 1e-6) matters to no draw.
U_MIN = 1e-10
U_MAX = 1.0 - 2.0**-20

# A vocabulary chunk per loop step and the warps of a program: 16 elements a thread. On an H100 with a
# 151936-token vocabulary this was the fastest or within 10% of it among chunks of 1024 to 8192 and 4
# to 16 warps, for 1 to 256 rows, greedy and sampled: one program walks a whole row, so the more warps
# in flight to hide latency the better.
BLOCK_V = 8192
NUM_WARPS = 16

LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def sample_tokens_ref(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [N, V]: the argmax where temperature <= 0, else a Gumbel-max draw.

    The same semantics as sample_tokens_triton. Greedy rows match it exactly (ties go to the lowest
    index, NaN logits never win); sampled rows draw their uniforms from a torch generator seeded with
    the row's seed instead of Philox, so they match it in distribution only. Syncs with the host.
    """
    scores = logits.float().masked_fill(logits.isnan(), float("-inf"))
    greedy = ~(temperature > 0)  # NaN temperatures are greedy, as in the kernel
    inv_t = 1.0 / torch.where(greedy, torch.ones_like(temperature), temperature)
    u = torch.empty_like(scores)
    for row, seed in enumerate(seeds.tolist()):
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(seed % 2**64)
        u[row].uniform_(generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp(U_MIN, U_MAX)))
    noisy = scores * inv_t.unsqueeze(1) + gumbel
    return torch.where(greedy, scores.argmax(dim=-1), noisy.argmax(dim=-1))


# ---------------------------------------------------------------------------------------------------
# Triton: one program per row walks the vocabulary in BLOCK_V chunks. Each lane keeps the best score
# it has seen and that score's index (a strict > keeps the first, lowest index on ties); one reduction
# at the end picks the best lane, the lowest index among equal scores.


@triton.jit(do_not_specialize=["row_stride"])
def _sample_kernel(
    logits_ptr,
    temperature_ptr,
    seeds_ptr,
    out_ptr,
    row_stride,
    VOCAB: tl.constexpr,
    BLOCK_V: tl.constexpr,
    U_MIN: tl.constexpr,
    U_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    sampled = temperature > 0.0
    inv_t = 1.0 / tl.where(sampled, temperature, 1.0)
    lanes = tl.arange(0, BLOCK_V)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, VOCAB, BLOCK_V):
        offs = start + lanes
        score = tl.load(row_ptr + offs, mask=offs < VOCAB, other=float("-inf")).to(tl.float32)
        if sampled:  # the same branch for the whole program: greedy rows skip the Philox draws
            u = tl.minimum(tl.maximum(tl.rand(seed, offs), U_MIN), U_MAX)
            score = score * inv_t - tl.log(-tl.log(u))
        take = score > best  # false for NaN: a NaN logit never wins
        best = tl.where(take, score, best)
        best_idx = tl.where(take, offs, best_idx)
    top = tl.max(best, axis=0)
    # an all -inf row leaves every lane at -inf with index 0: token 0, as torch.argmax gives
    token = tl.min(tl.where(best == top, best_idx, VOCAB), axis=0)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_tokens_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Triton sample_tokens_ref: int64 [N] token ids, written into out when given.

    logits [N, V] bfloat16, float16 or float32 with a unit last stride (any row stride); temperature
    float32 [N], <= 0 for greedy rows; seeds int64 [N], which the caller changes from step to step.
    Checks only shapes and dtypes, so it never syncs with the host. block_v (a power of two) overrides
    the chunk size; the tokens do not depend on it, and tests use small ones to walk several chunks.
    """
    require_triton()
    if logits.dim() != 2 or logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be [N, V] in {LOGIT_DTYPES}, got {tuple(logits.shape)} {logits.dtype}")
    n, vocab = logits.shape
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError("logits need a unit last stride")
    for name, t, dtype in (("temperature", temperature, torch.float32), ("seeds", seeds, torch.int64)):
        if t.shape != (n,) or t.dtype != dtype or not t.is_contiguous() or t.device != logits.device:
            raise ValueError(f"{name} must be a contiguous {dtype} [{n}] on {logits.device}")
    if out is None:
        out = torch.empty(n, dtype=torch.int64, device=logits.device)
    elif out.shape != (n,) or out.dtype != torch.int64 or not out.is_contiguous() or out.device != logits.device:
        raise ValueError(f"out must be a contiguous int64 [{n}] on {logits.device}")
    if n == 0:
        return out
    if vocab == 0:
        raise ValueError("logits have no vocabulary to sample from")
    block = max(16, min(block_v or BLOCK_V, next_pow2(vocab)))
    if block & (block - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    _sample_kernel[(n,)](
        logits,
        temperature,
        seeds,
        out,
        logits.stride(0),
        VOCAB=vocab,
        BLOCK_V=block,
        U_MIN=U_MIN,
        U_MAX=U_MAX,
        num_warps=max(1, min(NUM_WARPS, block // 512)),  # 16 elements a thread
    )
    return out
