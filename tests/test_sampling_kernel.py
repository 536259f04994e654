"""The fused sampling kernel against torch.argmax and softmax(logits / temperature).

Greedy rows must match torch.argmax exactly; sampled rows draw from Philox, which the torch reference
does not reproduce, so they are checked for determinism, for masking and in distribution. On a machine
without CUDA the kernel runs under Triton's interpreter, where each tl.rand4x call costs a few
milliseconds (about a hundred interpreted Philox ops), so sampled batches stay at a few hundred rows.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels.sampling import (  # noqa: E402
    default_num_chunks,
    sample_tokens_ref,
    sample_tokens_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The distribution checks: eight tokens with known logits at temperature 0.7.
LOGITS8 = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.25, 1.5])
TEMPERATURE8 = 0.7


def _temperature(values: list[float] | float, n: int | None = None) -> torch.Tensor:
    if isinstance(values, float):
        values = [values] * n
    return torch.tensor(values, dtype=torch.float32, device=DEVICE)


def _seeds(n: int, first: int = 0) -> torch.Tensor:
    return torch.arange(first, first + n, dtype=torch.int64, device=DEVICE)


def _tv_bound(rows: int) -> float:
    """About 1.2 times the 99.9% quantile of the total variation of `rows` exact draws from LOGITS8.

    0.097 at 512 rows: a temperature left out (true distance 0.13) fails it nine times in ten, one
    applied upside down or a shifted token order every time; a temperature off by 15% needs the GPU's
    20,000 rows (0.016) to show.
    """
    return 2.2 / rows**0.5


def _total_variation(tokens: torch.Tensor, logits: torch.Tensor, temperature: float) -> float:
    freq = torch.bincount(tokens.cpu(), minlength=len(logits)).double() / len(tokens)
    probs = (logits.double() / temperature).softmax(-1)
    return 0.5 * (freq - probs).abs().sum().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab,block_v", [(37, None), (1000, None), (1000, 128)])
def test_greedy_matches_argmax(dtype: torch.dtype, vocab: int, block_v: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(3, vocab, generator=gen)
    ties = torch.randint(-8, 8, (3, vocab), generator=gen) / 4  # the top value repeats across chunks
    logits = torch.cat([smooth, ties]).to(dtype).to(DEVICE)
    got = sample_tokens_triton(logits, _temperature(0.0, 6), _seeds(6), block_v=block_v)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(dim=-1))
    assert torch.equal(sample_tokens_ref(logits, _temperature(0.0, 6), _seeds(6)), got)


def test_greedy_strided_row_view_into_out() -> None:
    base = torch.randn(8, 1200, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    logits = base[::2, 100:1100]  # every other row of a wider buffer
    assert logits.stride() == (2400, 1)
    out = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    got = sample_tokens_triton(logits, _temperature(0.0, 4), _seeds(4), out=out, block_v=256)
    assert got is out
    assert torch.equal(out, logits.argmax(dim=-1))


def test_greedy_nan_and_masked_rows() -> None:
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(2))
    logits[0, 17] = float("nan")  # never wins (torch.argmax would pick it)
    logits[0, 201] = 9.0
    logits[1] = float("-inf")  # all masked: token 0, as torch.argmax gives
    logits[2] = float("-inf")
    logits[2, 250] = -5.0
    logits = logits.to(DEVICE)
    got = sample_tokens_triton(logits, _temperature(0.0, 3), _seeds(3), block_v=128)
    assert got.tolist() == [201, 0, 250]
    assert torch.equal(sample_tokens_ref(logits, _temperature(0.0, 3), _seeds(3)), got)


def test_same_seed_same_token_other_seed_other_token() -> None:
    n, vocab = 16, 512
    logits = torch.zeros(n, vocab, device=DEVICE)  # uniform: two draws collide with probability 1/512
    temperature = _temperature(1.0, n)
    seeds = 1234 + 7919 * _seeds(n)
    first = sample_tokens_triton(logits, temperature, seeds)
    assert torch.equal(sample_tokens_triton(logits, temperature, seeds), first)
    assert len(set(first.tolist())) >= n - 2
    # a row's token depends on its seed, not on where it sits in the batch
    assert torch.equal(sample_tokens_triton(logits, temperature, seeds.flip(0)), first.flip(0))
    assert (sample_tokens_triton(logits, temperature, seeds + 1) != first).sum() >= n - 2
    # the high 32 bits of the seed key Philox too
    assert (sample_tokens_triton(logits, temperature, seeds + (1 << 32)) != first).sum() >= n - 2


def test_masked_tokens_never_sampled() -> None:
    n, vocab = 64, 300
    allowed = [3, 130, 131, 299]  # spread over the three 128-wide chunks
    logits = torch.full((n, vocab), float("-inf"))
    logits[:, allowed] = torch.tensor([0.0, -1.0, 1.0, 0.5])
    logits = logits.to(torch.bfloat16).to(DEVICE)
    temperature = _temperature(2.0, n)
    got = sample_tokens_triton(logits, temperature, _seeds(n, 99), block_v=128)
    assert set(got.tolist()) == set(allowed)
    assert set(sample_tokens_ref(logits, temperature, _seeds(n, 99)).tolist()) == set(allowed)
    # a sampled row with every token masked returns some index and does not fail
    masked = torch.full((2, vocab), float("-inf"), device=DEVICE)
    got = sample_tokens_triton(masked, _temperature(1.0, 2), _seeds(2))
    assert ((got >= 0) & (got < vocab)).all()


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = (3 * torch.randn(8, 700, generator=torch.Generator().manual_seed(3))).half().to(DEVICE)
    temperature = _temperature([0.0, 1.0, 0.0, 0.5, 0.0, 2.0, 0.0, 1.0])
    seeds = _seeds(8, 42)
    got = sample_tokens_triton(logits, temperature, seeds, block_v=256)
    greedy = temperature == 0
    assert torch.equal(got[greedy], logits[greedy].argmax(dim=-1))
    assert torch.equal(sample_tokens_ref(logits, temperature, seeds)[greedy], got[greedy])
    # the sampled rows draw the same tokens alone, and with another chunk size (1024 here)
    alone = sample_tokens_triton(logits[~greedy], temperature[~greedy], seeds[~greedy])
    assert torch.equal(alone, got[~greedy])


SPLITS = [(block_v, chunks) for block_v in (64, 256) for chunks in (1, 2, 3, 7)]


def test_tokens_do_not_depend_on_the_split() -> None:
    """Chunks of 64 and 256 over 1000 tokens (neither divides it): 16 and 4 blocks a row, split into 1, 2,
    3 and 7 slices (7 of 4 blocks clamps to 4, 7 of 16 to 6 slices of 3 blocks); greedy and sampled rows
    mixed."""
    logits = (3 * torch.randn(6, 1000, generator=torch.Generator().manual_seed(5))).to(torch.bfloat16).to(DEVICE)
    temperature = _temperature([0.0, 0.7, 1.0, 0.0, 2.0, 0.0])
    seeds = _seeds(6, 500)
    want = sample_tokens_triton(logits, temperature, seeds, num_chunks=1)  # one program a row
    greedy = temperature == 0
    assert torch.equal(want[greedy], logits[greedy].argmax(dim=-1))
    for block_v, chunks in SPLITS:
        got = sample_tokens_triton(logits, temperature, seeds, block_v=block_v, num_chunks=chunks)
        assert torch.equal(got, want), (block_v, chunks)
    out = torch.full((6,), -1, dtype=torch.int64, device=DEVICE)  # the partials get their own buffer
    assert sample_tokens_triton(logits, temperature, seeds, out=out, block_v=64, num_chunks=5) is out
    assert torch.equal(out, want)
    assert torch.equal(sample_tokens_triton(logits, temperature, seeds), want)  # the default split


def test_sampled_tokens_do_not_depend_on_the_block_or_the_warps() -> None:
    """Index i takes output i % 4 of Philox counter i // 4 whatever block holds it: 12 sampled rows of 600
    tokens, a seed each, under blocks of 32 to 1024 (the default here; none divides 600) and 1 to 4 warps."""
    n, vocab = 12, 600
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    temperature = _temperature([0.5, 1.0, 2.0, 4.0] * 3)
    seeds = 77 + 7919 * _seeds(n)
    want = sample_tokens_triton(logits, temperature, seeds)
    assert (want != logits.argmax(dim=-1)).sum() >= n // 2  # the rows sample: the noise is in play
    for block_v, warps in [(32, 1), (128, 4), (256, 2), (512, None)]:
        got = sample_tokens_triton(logits, temperature, seeds, block_v=block_v, num_warps=warps, num_chunks=1)
        assert torch.equal(got, want), (block_v, warps)


def test_ties_across_slices_go_to_the_lowest_index() -> None:
    vocab = 300  # 19 blocks of 16 (the last one partial)
    logits = torch.randn(7, vocab, generator=torch.Generator().manual_seed(6)).clamp(max=3.0)
    logits[0, [40, 100, 250, 299]] = 5.0  # the top value in several slices
    logits[1] = float("-inf")
    logits[1, [33, 150, 290]] = -3.5  # a negative top: the keys must order negative scores too
    logits[2] = -(torch.rand(vocab, generator=torch.Generator().manual_seed(7)) + 0.1) * 100
    logits[3] = float("-inf")
    logits[3, [70, 200]] = 0.0
    logits[3, [20, 280]] = -0.0  # -0.0 == +0.0: index 20 wins
    logits[4, [90, 91, 260]] = float("inf")
    logits[5] = torch.arange(vocab) % 17 == 16  # 1.0 at 16, 33, ...: ties inside and across blocks
    logits[6, 150:] = 7.0  # the top from a slice boundary on
    logits = logits.to(DEVICE)
    want = [40, 33, logits[2].argmax().item(), 20, 90, 16, 150]
    assert logits.argmax(dim=-1).tolist() == want
    for dtype in (torch.float32, torch.bfloat16):
        for chunks in (1, 2, 3, 7, 19):
            got = sample_tokens_triton(logits.to(dtype), _temperature(0.0, 7), _seeds(7), block_v=16, num_chunks=chunks)
            assert got.tolist() == want, (dtype, chunks)


def test_nan_and_all_masked_rows_across_slices() -> None:
    vocab = 500
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(8))
    logits[0, 3] = float("nan")  # NaN in the first slice, the top in the last
    logits[0, 480] = 9.0
    logits[1] = float("-inf")  # all masked, greedy
    logits[2] = float("-inf")  # all masked, sampled
    logits[3] = float("nan")  # nothing but NaN
    logits[4] = float("-inf")
    logits[4, ::7] = float("nan")  # NaN and -inf only
    logits[5] = float("-inf")
    logits[5, 499] = -1e30  # the one finite logit is the last
    logits = logits.to(DEVICE)
    temperature = _temperature([0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    for block_v, chunks in [(None, None), *SPLITS]:
        got = sample_tokens_triton(logits, temperature, _seeds(6), block_v=block_v, num_chunks=chunks)
        assert got.tolist() == [480, 0, 0, 0, 0, 499], (block_v, chunks)
    greedy = temperature == 0
    assert torch.equal(sample_tokens_ref(logits, temperature, _seeds(6))[greedy], got[greedy])


def test_default_num_chunks() -> None:
    # an H100 (132 SMs), BLOCK_V 2048: a 151936-token row is 75 blocks
    assert [default_num_chunks(n, 151936, 2048, 132) for n in (1, 8, 64, 256, 528, 4096)] == [75, 66, 9, 3, 1, 1]
    assert default_num_chunks(1, 100, 2048, 132) == 1  # one block: nothing to split
    assert default_num_chunks(0, 151936, 2048, 132) == 75
    logits = torch.zeros(0, 64, device=DEVICE)
    assert sample_tokens_triton(logits, _temperature(0.0, 0), _seeds(0)).shape == (0,)
    with pytest.raises(ValueError, match="num_chunks"):
        sample_tokens_triton(torch.zeros(1, 64, device=DEVICE), _temperature(0.0, 1), _seeds(1), num_chunks=0)


def test_triton_distribution_matches_softmax() -> None:
    rows = 20_000 if DEVICE == "cuda" else 512  # 512 rows take about 3 s under the interpreter
    logits = LOGITS8.to(DEVICE).expand(rows, -1)  # a row stride of 0 is a valid row stride too
    tokens = sample_tokens_triton(logits, _temperature(TEMPERATURE8, rows), _seeds(rows, 10_000))
    assert _total_variation(tokens, LOGITS8, TEMPERATURE8) < _tv_bound(rows)


def test_ref_distribution_matches_softmax() -> None:
    rows = 4000
    logits = LOGITS8.to(DEVICE).expand(rows, -1)
    tokens = sample_tokens_ref(logits, _temperature(TEMPERATURE8, rows), _seeds(rows, 10_000))
    assert _total_variation(tokens, LOGITS8, TEMPERATURE8) < _tv_bound(rows)


def test_rejects_bad_inputs() -> None:
    logits = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="unit last stride"):
        sample_tokens_triton(logits.t(), _temperature(0.0, 64), _seeds(64))
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens_triton(logits, _temperature(0.0, 4).double(), _seeds(4))
    with pytest.raises(ValueError, match="seeds"):
        sample_tokens_triton(logits, _temperature(0.0, 4), _seeds(4).int())
    with pytest.raises(ValueError, match="out"):
        sample_tokens_triton(logits, _temperature(0.0, 4), _seeds(4), out=torch.empty(4, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs and CUDA graphs need a GPU")
def test_no_host_sync_and_cuda_graph_replay() -> None:
    n, vocab = 4, 151936
    logits = torch.zeros(n, vocab, dtype=torch.bfloat16, device=DEVICE)
    temperature = _temperature([0.0, 1.0, 1.0, 1.0])
    seeds = _seeds(n)
    out = torch.empty(n, dtype=torch.int64, device=DEVICE)
    sample_tokens_triton(logits, temperature, seeds, out=out)  # compiles outside the checks
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_tokens_triton(logits, temperature, seeds, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample_tokens_triton(logits, temperature, seeds, out=out)
    tokens = []
    for step in range(3):
        seeds.copy_(_seeds(n, 1000 * step))
        graph.replay()
        tokens.append(out.clone())
        assert torch.equal(out, sample_tokens_triton(logits, temperature, seeds))
    assert all(t[0].item() == 0 for t in tokens)  # greedy over a flat row: token 0
    assert not torch.equal(tokens[1][1:], tokens[2][1:])


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton compiles only on a GPU")
def test_one_compiled_variant_for_every_row_count() -> None:
    """A decode batch shrinks one row at a time; a kernel variant per row count (a partials pointer of
    other alignment, a reduce width, a size divisible by 16) stalled the throughput run mid-way."""
    from mini_infer.bench.common import triton_compiles

    vocab = 151936
    logits = torch.randn(64, vocab, dtype=torch.bfloat16, device=DEVICE)
    sample_tokens_triton(logits[:5], _temperature(1.0, 5), _seeds(5))  # the variant for split rows
    with triton_compiles() as compiled:
        for n in range(1, 65):
            sample_tokens_triton(logits[:n], _temperature(1.0, n), _seeds(n))
        torch.cuda.synchronize()
    assert compiled == []
