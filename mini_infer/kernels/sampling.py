"""Fused token sampling: greedy argmax and Gumbel-max sampling in one pass over the logits.

Sampling with torch reads and writes the [N, V] logits about seven times: a float copy, the divide by
temperature, the softmax, the noise draw, the divide by the noise, the argmax, and the where that picks
the greedy rows. The kernel reads each logit once. Greedy rows (temperature <= 0) keep a running argmax
of the logits; the others keep a running argmax of logits / temperature + g with Gumbel noise
g = -log(-log(u)), which picks token i with probability softmax(logits / temperature)[i] (the Gumbel-max
trick) without ever forming the softmax. The kernel scores sampled rows in base 2, log2(e) * logits /
temperature - log2(-log2(u)), which is log2(e) times that score less a constant and so has the same
argmax: on NVIDIA GPUs a log2 is one hardware lg2.approx where a natural log is a libdevice polynomial.

The vocabulary of a row is split across programs: a grid of (rows, slices), each program walking one
contiguous slice of one row, and a second small launch reducing each row's slice winners to its token
(the max score, ties to the lowest index). One program per row left all but a few SMs idle for a few
rows; default_num_chunks picks the number of slices from the shapes alone, many for few rows and one
(a single launch) once the rows alone fill the GPU.

The uniforms come from Triton's counter-based Philox, keyed by a per-row int64 seed read from a tensor:
one tl.rand4x(seed, c) call gives four, and global vocabulary index i takes output i % 4 of counter
c = i // 4, so ten Philox rounds serve four logits. A row's token thus depends only on its logits,
temperature and seed (not on the batch around it, the block size, the number of slices, the warps or
the launch), and no generator state lives on the host, so the launches need no host sync and can sit
in a CUDA graph. Top-k, top-p, min-p and penalties are not handled here: rows that need them take the
torch sampler.
"""

import os

import torch

from mini_infer.kernels._triton import next_pow2, num_sms, require_triton, tl, triton

# u is clamped into [U_MIN, U_MAX] before the two logs. Only an exact 0 falls under U_MIN (Triton's
# smallest nonzero draw is 2**-31), and U_MAX keeps -log2(u) >= 1.4e-6, well clear of the error of the
# fast lg2.approx the kernel uses on NVIDIA GPUs (at most 2**-22 absolute for u in [0.5, 1], CUDA's
# __log2f), which could otherwise round it to 0 and make the noise infinite; the clamped mass (about
# 1e-6) matters to no draw. That error is a few times the float32 spacing of u below 1 (2**-24), which
# every draw already carries.
U_MIN = 1e-10
U_MAX = 1.0 - 2.0**-20

# The grid is (rows, chunks): each program walks one row's contiguous slice of the vocabulary, a whole
# number of BLOCK_V blocks, one block per loop step, and a second tiny launch reduces each row's
# per-slice winners to its token (one launch only, straight into out, when a row is one slice).
#
# The defaults, BLOCK_V 2048 with 8 warps (8 elements a thread) and about 4 programs per SM, are within 7%
# of the fastest shape swept on an H100 for 1 to 256 rows of 128256 or 151936 logits, sampled or greedy,
# except 256 greedy rows, 20% behind (benchmarks/sampling_sweep.py: CUDA-graph replay, cold logits;
# benchmarks/results/h100/sampling_sweep.json). One sampled row of 151936 takes ~3.7 us, 256 ~66 us, 256
# greedy rows ~40 us. Many sampled rows are bound by instruction issue, not bandwidth, hence four uniforms
# a Philox call and the hardware lg2.approx: about 31 instructions a sampled logit in the loop (sm_90 SASS).
BLOCK_V = 2048
ELEMENTS_PER_THREAD = 8
MAX_WARPS = 16
PROGRAMS_PER_SM = 4

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
# Triton. A program walks its slice of a row in BLOCK_V blocks. Each lane keeps the best score it has
# seen and that score's index (a strict > keeps the first, lowest index on ties); one reduction at the
# end picks the best lane, the lowest index among equal scores. With one slice a row that is the
# token; otherwise the slice's winner goes to partials as one int64 key that orders like (score, then
# lower index), so the second launch takes a plain max of a row's keys. Lowest index among the maxima
# of slices is the lowest index among the maxima of the row, so the token does not depend on the split.

# A key's low 31 bits hold INDEX_MASK - index; the bits above them the float32 score mapped to an
# unsigned 32-bit integer with the same order. Every key is >= 0, so padding with -1 never wins.
INDEX_MASK = 2**31 - 1


def default_num_chunks(n_rows: int, vocab: int, block_v: int, sms: int) -> int:
    """Slices a row's vocabulary is split into: about PROGRAMS_PER_SM programs an SM, from the shapes alone.

    One program per row leaves most SMs idle for a few rows (one sampled row kept one SM of 132 busy),
    so few rows split into many slices, down to one BLOCK_V block each; many rows already fill the GPU
    and take fewer, longer slices (one, and a single launch, from PROGRAMS_PER_SM * sms rows up), which
    keeps the partials and the second launch negligible. Depends on no data, so a CUDA graph captures it.
    """
    blocks = -(-vocab // block_v)
    target = PROGRAMS_PER_SM * sms
    return max(1, min(blocks, -(-target // max(1, n_rows))))


def launch_shape(
    n_rows: int,
    vocab: int,
    sms: int,
    block_v: int | None = None,
    num_chunks: int | None = None,
    num_warps: int | None = None,
) -> tuple[int, int, int, int]:
    """(block, slices a row, tokens a slice, warps) of a launch, the overrides applied; shapes alone.

    A slice is a whole number of blocks and none is empty, so num_chunks is rounded to what tiles the
    row: 7 slices of a 16-block row become 6 slices of 3 blocks.
    """
    block = max(16, min(block_v or BLOCK_V, next_pow2(vocab)))  # the kernel walks rows of 8 logits
    if block & (block - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    blocks = -(-vocab // block)
    chunks = default_num_chunks(n_rows, vocab, block, sms) if num_chunks is None else num_chunks
    if chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    blocks_per_chunk = -(-blocks // min(chunks, blocks))
    warps = num_warps or max(1, min(MAX_WARPS, block // (32 * ELEMENTS_PER_THREAD)))
    return block, -(-blocks // blocks_per_chunk), blocks_per_chunk * block, warps


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2(x): one hardware lg2.approx where FAST (NVIDIA GPUs), else tl.log2 (the interpreter, ROCm).

    On NVIDIA tl.log2 lowers to libdevice's full-precision __nv_log2f, about 20 instructions. The inputs
    here, u and -log2(u), lie in [1e-10, 34], so flushing subnormals (ftz) changes nothing.
    """
    if FAST:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _update_best(
    row_ptr,
    start,
    limit,
    best,
    best_idx,
    sampled,
    seed,
    scale,
    BLOCK_V: tl.constexpr,
    MASKED: tl.constexpr,
    FAST_LOG2: tl.constexpr,
    U_MIN,
    U_MAX,
):
    """Folds the block of logits from global vocabulary index start into the per-lane best and its index.

    The block is [BLOCK_V // 8, 8], row r holding indices start + 8r .. start + 8r + 7: eight 16-bit
    logits are one 16-byte load, and the outputs of two Philox calls.
    """
    rows = tl.arange(0, BLOCK_V // 8)
    offs = start + 8 * rows[:, None] + tl.arange(0, 8)[None, :]
    if MASKED:
        score = tl.load(row_ptr + offs, mask=offs < limit, other=float("-inf")).to(tl.float32)
    else:  # no mask: nothing keeps the compiler from 16-byte loads
        score = tl.load(row_ptr + offs).to(tl.float32)
    if sampled:  # the same branch for the whole program: greedy rows skip the Philox draws
        # index i takes output i % 4 of counter i // 4 (start is a multiple of 8), so the draws do not
        # depend on the split, the block or the warps. [r, k] is counter start // 4 + 2r + k. join stacks
        # on a new last axis, so joining the pairs (0, 2) and (1, 3) puts output 2b + c at [r, k, b, c],
        # which the reshape makes [r, 4k + 2b + c]: index start + 8r + 4k + j takes output j.
        counters = start // 4 + 2 * rows[:, None] + tl.arange(0, 2)[None, :]
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK_V // 8, 8])
        u = tl.minimum(tl.maximum(u, U_MIN), U_MAX)
        # log2(e) * (logit / temperature + g) less a constant: the same argmax, with two log2 for two ln
        score = score * scale - _log2(-_log2(u, FAST_LOG2), FAST_LOG2)
    take = score > best  # false for NaN: a NaN logit never wins
    return tl.where(take, score, best), tl.where(take, offs, best_idx)


# row_stride, vocab and chunk_len stay specialized (Triton compiles a variant for multiples of 16): a
# row start or block start of unknown alignment turns every 16-byte load into eight 2-byte loads.
@triton.jit
def _sample_chunk_kernel(
    logits_ptr,
    temperature_ptr,
    seeds_ptr,
    dst_ptr,
    row_stride,
    vocab,
    chunk_len,
    BLOCK_V: tl.constexpr,
    SPLIT: tl.constexpr,
    FAST_LOG2: tl.constexpr,
    U_MIN: tl.constexpr,
    U_MAX: tl.constexpr,
    INDEX_MASK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row * row_stride
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    sampled = temperature > 0.0
    scale = 1.4426950408889634 / tl.where(sampled, temperature, 1.0)  # log2(e) / temperature
    best = tl.full([BLOCK_V // 8, 8], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_V // 8, 8], tl.int32)
    chunk_start = chunk * chunk_len  # a multiple of BLOCK_V
    chunk_end = tl.minimum(chunk_start + chunk_len, vocab)
    full_end = chunk_start + (chunk_end - chunk_start) // BLOCK_V * BLOCK_V
    for start in range(chunk_start, full_end, BLOCK_V):
        best, best_idx = _update_best(
            row_ptr, start, chunk_end, best, best_idx, sampled, seed, scale, BLOCK_V, False, FAST_LOG2, U_MIN, U_MAX
        )
    if full_end < chunk_end:  # the row's last, partial block
        best, best_idx = _update_best(
            row_ptr, full_end, chunk_end, best, best_idx, sampled, seed, scale, BLOCK_V, True, FAST_LOG2, U_MIN, U_MAX
        )
    top = tl.max(best, axis=None)
    # a slice of -inf leaves every lane at -inf with index 0, so an all -inf row gives token 0, as
    # torch.argmax does
    token = tl.min(tl.where(best == top, best_idx, INDEX_MASK), axis=None)
    if SPLIT:
        top = tl.where(top == 0.0, 0.0, top)  # -0.0 ties +0.0, as in the float compares above
        bits = top.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # a signed int32 in the order of the floats
        key = (ordered.to(tl.int64) << 31) + (1 << 62) + (INDEX_MASK - token)  # >= 0: -1 pads
        tl.store(dst_ptr + row * tl.num_programs(1) + chunk, key)
    else:
        tl.store(dst_ptr + row, token.to(tl.int64))


# num_chunks changes with the batch size; left specialized, a multiple of 16 would compile a second variant
# in the middle of a run.
@triton.jit(do_not_specialize=["num_chunks"])
def _reduce_chunks_kernel(partials_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr, INDEX_MASK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    keys = tl.load(partials_ptr + row * num_chunks + offs, mask=offs < num_chunks, other=-1)
    best = tl.max(keys, axis=0)
    tl.store(out_ptr + row, INDEX_MASK - (best & INDEX_MASK))


def sample_tokens_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    num_chunks: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Triton sample_tokens_ref: int64 [N] token ids, written into out when given.

    logits [N, V] bfloat16, float16 or float32 with a unit last stride (any row stride); temperature
    float32 [N], <= 0 for greedy rows; seeds int64 [N], which the caller changes from step to step.
    Checks only shapes and dtypes, so it never syncs with the host; at most two launches and one small
    allocation (the per-slice partials, with out when out is None), all sized by the shapes alone.
    block_v (a power of two), num_chunks (slices a row, clamped to the blocks of a row) and num_warps
    override the defaults (default_num_chunks; ELEMENTS_PER_THREAD); the tokens depend on none of them,
    and tests use small blocks to walk several blocks and slices.
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
    if out is not None and (
        out.shape != (n,) or out.dtype != torch.int64 or not out.is_contiguous() or out.device != logits.device
    ):
        raise ValueError(f"out must be a contiguous int64 [{n}] on {logits.device}")
    if n == 0:
        return out if out is not None else torch.empty(0, dtype=torch.int64, device=logits.device)
    if vocab == 0:
        raise ValueError("logits have no vocabulary to sample from")
    if vocab > 2**30:  # int32 offsets, with a block to spare, and 31-bit indices in the keys
        raise ValueError(f"a vocabulary of {vocab} tokens is too large")
    block, chunks, chunk_len, warps = launch_shape(n, vocab, num_sms(logits.device), block_v, num_chunks, num_warps)
    # lg2.approx is PTX: not for ROCm, nor for the interpreter (which a CUDA machine can run too)
    fast_log2 = logits.is_cuda and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"
    split = chunks > 1
    if not split:
        dst = out = torch.empty(n, dtype=torch.int64, device=logits.device) if out is None else out
    elif out is None:  # one allocation: out, then the partials from a 16-byte boundary (an odd n would
        # misalign them, and Triton compiles another variant for a pointer of other alignment)
        start = n + n % 2
        buf = torch.empty(start + n * chunks, dtype=torch.int64, device=logits.device)
        out, dst = buf[:n], buf[start:]
    else:
        dst = torch.empty(n * chunks, dtype=torch.int64, device=logits.device)
    _sample_chunk_kernel[(n, chunks)](
        logits,
        temperature,
        seeds,
        dst,
        logits.stride(0),
        vocab,
        chunk_len,
        BLOCK_V=block,
        SPLIT=split,
        FAST_LOG2=fast_log2,
        U_MIN=U_MIN,
        U_MAX=U_MAX,
        INDEX_MASK=INDEX_MASK,
        num_warps=warps,
    )
    if split:  # sized by the most slices a row can have, so one compiled variant serves every batch size
        block_c = max(16, next_pow2(-(-vocab // block)))
        _reduce_chunks_kernel[(n,)](dst, out, chunks, BLOCK_C=block_c, INDEX_MASK=INDEX_MASK, num_warps=1)
    return out
