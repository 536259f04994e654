"""The fused sampling kernel against torch.argmax and softmax(logits / temperature).

Greedy rows must match torch.argmax exactly; sampled rows draw from Philox, which the torch reference
does not reproduce, so they are checked for determinism, for masking and in distribution. On a machine
without CUDA the kernel runs under Triton's interpreter, where each tl.rand call costs a few
milliseconds (about a hundred interpreted Philox ops), so sampled batches stay at a few hundred rows.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels.sampling import sample_tokens_ref, sample_tokens_triton  # noqa: E402

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
