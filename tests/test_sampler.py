"""Sampler: seeds, top-k/top-p against greedy, the empirical distribution, penalties, logprobs,
stop strings across token boundaries, min_tokens and n > 1."""

from __future__ import annotations

import math

import pytest
import torch

from mini_infer import LLM, SamplingParams
from mini_infer.sampler import apply_penalties, build_sampling_batch, sample


@pytest.fixture(scope="module")
def llm(stories_path: str) -> LLM:
    return LLM(stories_path, dtype="float32")


def tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_seed_reproducible_across_batch_mixes(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=30)
    alone = tokens(llm, ["Once upon a time"], seeded)[0]
    others = [SamplingParams(temperature=0.8, max_tokens=40), SamplingParams(temperature=1.2, seed=7, max_tokens=10)]
    mixed = tokens(llm, ["The dog", "Once upon a time", "Ben"], [others[0], seeded, others[1]])
    assert mixed[1] == alone
    assert tokens(llm, ["Once upon a time"], SamplingParams(temperature=1.0, seed=99, max_tokens=30))[0] != alone


def test_top_k_1_and_tiny_top_p_equal_greedy(llm):
    prompts = ["Once upon a time", "The cat sat on the"]
    greedy = tokens(llm, prompts, SamplingParams(temperature=0, max_tokens=30))
    assert tokens(llm, prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=30)) == greedy
    assert tokens(llm, prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=30)) == greedy


def _batch(params, n_rows, vocab, outputs=None, prompts=None):
    return build_sampling_batch(
        [params] * n_rows,
        prompts or [[0]] * n_rows,
        outputs or [[]] * n_rows,
        [None] * n_rows,
        vocab,
        torch.device("cpu"),
    )


def test_empirical_distribution_matches_softmax():
    torch.manual_seed(0)
    vocab, rows = 8, 40000
    logits = torch.randn(vocab) * 1.5
    got = sample(logits.expand(rows, vocab).clone(), _batch(SamplingParams(temperature=1.0), rows, vocab))
    counts = torch.bincount(torch.tensor(got.token_ids), minlength=vocab).double() / rows
    probs = logits.double().softmax(-1)
    # each frequency is within 5 standard deviations of binomial sampling noise
    bound = 5 * torch.sqrt(probs * (1 - probs) / rows)
    assert torch.all((counts - probs).abs() <= bound), (counts, probs)


def test_top_p_and_min_p_distributions():
    torch.manual_seed(0)
    vocab, rows = 6, 30000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -2.0])
    probs = logits.softmax(-1)
    top_p = sample(logits.expand(rows, vocab).clone(), _batch(SamplingParams(top_p=0.7), rows, vocab))
    kept = torch.cumsum(probs, 0) - probs < 0.7  # nucleus: first 3 tokens here
    assert set(top_p.token_ids) == set(torch.nonzero(kept).flatten().tolist())
    min_p = sample(logits.expand(rows, vocab).clone(), _batch(SamplingParams(min_p=0.3), rows, vocab))
    assert set(min_p.token_ids) == set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())


def test_penalties_match_plain_reference():
    torch.manual_seed(0)
    vocab = 10
    logits = torch.randn(2, vocab)
    prompts, outputs = [[1, 2], [3]], [[2, 2, 5], []]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3)
    b = build_sampling_batch([params, params], prompts, outputs, [None, None], vocab, torch.device("cpu"))
    got = apply_penalties(logits.clone(), b)
    want = logits.clone()
    for r in range(2):
        for t in range(vocab):
            if t in prompts[r] or t in outputs[r]:
                want[r, t] = want[r, t] / 1.3 if want[r, t] > 0 else want[r, t] * 1.3
            count = outputs[r].count(t)
            want[r, t] -= 0.3 * count + (0.5 if count else 0.0)
    torch.testing.assert_close(got, want)


def test_repetition_penalty_changes_greedy_text(llm):
    plain = tokens(llm, ["Once upon a time"], SamplingParams(temperature=0, max_tokens=60))[0]
    penalised = tokens(llm, ["Once upon a time"], SamplingParams(temperature=0, max_tokens=60, repetition_penalty=1.5))[
        0
    ]
    assert plain != penalised


def test_logprobs_shape(llm):
    out = llm.generate(
        "Once upon a time", SamplingParams(temperature=0.7, seed=3, max_tokens=8, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 8
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        ranked = sorted((lp.rank, lp.logprob) for t, lp in entry.items() if t != token or lp.rank <= 3)
        assert [r for r, _ in ranked][:3] == [1, 2, 3]
        assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))
        assert entry[token].decoded_token is not None
        total += entry[token].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


def test_stop_strings_across_token_boundaries(llm, stories_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_path)
    full = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0]
    text, ids = full.outputs[0].text, full.outputs[0].token_ids
    # a stop string made of the end of one token and the start of the next
    pieces = [tok.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
    boundary = len(pieces[10])
    stop = text[boundary - 2 : boundary + 3]
    assert text.find(stop) == boundary - 2
    cut = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=60, stop=[stop]), use_tqdm=False)[
        0
    ].outputs[0]
    assert cut.text == text[: boundary - 2]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(
        "Once upon a time",
        SamplingParams(temperature=0, max_tokens=60, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == text[: boundary + 3]


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=400), use_tqdm=False)[0]
    n = len(base.outputs[0].token_ids)  # ends with EOS id 1
    longer = llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=n + 20, min_tokens=n + 5), use_tqdm=False
    )[0].outputs[0]
    assert len(longer.token_ids) >= n + 5 and 1 not in longer.token_ids[: n + 4]
    stop_tok = base.outputs[0].token_ids[3]
    stopped = llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=50, stop_token_ids=[stop_tok]), use_tqdm=False
    )[0]
    assert stopped.outputs[0].token_ids == base.outputs[0].token_ids[:4]
    assert stopped.outputs[0].stop_reason == stop_tok
    ignored = llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=n + 10, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert len(ignored.token_ids) == n + 10 and ignored.finish_reason == "length"


def test_n_samples_share_prompt_blocks(stories_path):
    llm = LLM(stories_path)
    prompt = "Lily and Tom went to the park. They saw a big dog. The dog was happy and"
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=20), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert llm.llm_engine.stats.prefix_cache_hits >= 2 * 16  # samples 2 and 3 reuse the prompt's block


def test_sampling_warm_up_leaves_generation_unchanged(llm):
    """On a GPU the warm-up compiles the kernels outside the CUDA graphs at startup (here it takes the
    torch path); it must leave no trace in what the engine generates next."""
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=12)
    before = tokens(llm, ["Once upon a time", "The cat"], [greedy, seeded])
    runner = llm.llm_engine.model_runner
    runner.warm_up_sampling()
    assert tokens(llm, ["Once upon a time", "The cat"], [greedy, seeded]) == before
