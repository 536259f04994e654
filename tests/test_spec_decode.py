"""Speculative decoding with n-gram drafts: the same tokens as without speculation (greedy: identical to
transformers; sampled: the same distribution, checked against transformers' exact probabilities), seeds
reproducible across batches, stops inside an accepted run, no leaked blocks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPTS, _hf_model, hf_greedy

from mini_infer import LLM as _LLM
from mini_infer import SamplingParams
from mini_infer.sampler import build_sampling_batch
from mini_infer.spec_decode.config import SpeculativeConfig
from mini_infer.spec_decode.ngram import propose_ngram
from mini_infer.spec_decode.rejection_sampler import rejection_sample

REPEATING = "Lily and Tom went to the park. Lily and Tom saw a dog. Lily and Tom"


def LLM(model: str, **kwargs) -> _LLM:  # noqa: N802
    """float32, so that exactness holds on a GPU too (dtype auto picks bf16 there)."""
    return _LLM(model, dtype="float32", **kwargs)


def ngram(k: int, **kwargs) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, **kwargs}


def test_ngram_proposals():
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 3, 1, 4) == [4, 1, 2]  # the longest recurring suffix
    assert propose_ngram([5, 6, 7, 8], 2, 1, 4) == []
    assert propose_ngram([1, 2, 1, 2, 1, 2], 4, 1, 3) == [1, 2]  # its latest earlier occurrence
    assert propose_ngram([9, 1, 2, 3, 9, 1, 2, 3], 2, 3, 3) == [9, 1]
    assert propose_ngram([7, 7], 5, 1, 4) == [7]  # only what exists after the match


def test_config_is_validated():
    for bad in (
        {"method": "eagle", "num_speculative_tokens": 2},
        {"method": "ngram", "num_speculative_tokens": 0},
        {"method": "ngram"},
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5},
        {"method": "ngram", "num_speculative_tokens": 2, "typo": 1},
        "{not json",
    ):
        with pytest.raises(ValueError, match="speculative_config"):
            SpeculativeConfig.parse(bad)
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}').num_speculative_tokens == 3


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_tokens_equal_transformers(stories_path, k):
    llm = LLM(stories_path, speculative_config=ngram(k))
    prompts = [REPEATING, *PROMPTS[:4]]
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=120), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(stories_path, tokenizer.encode(prompt), 120)
        expected = expected[: expected.index(2) + 1] if 2 in expected else expected  # it stops on EOS
        assert out.outputs[0].token_ids == expected, prompt
    stats = llm.llm_engine.stats
    assert stats.spec_num_accepted_tokens > 20 and stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens
    assert len(stats.spec_num_accepted_per_pos) == k and stats.spec_num_accepted_per_pos[0] > 0
    assert stats.generation_tokens == sum(len(out.outputs[0].token_ids) for out in outs)  # every token of a run
    assert stats.num_kv_blocks_used == 0


def test_stops_inside_an_accepted_run(stories_path):
    """max_tokens, a stop string and a stop token reached in the middle of a verified run end the output
    exactly where they do without speculation."""
    plain, spec = LLM(stories_path), LLM(stories_path, speculative_config=ngram(5))
    base = plain.generate(REPEATING, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0].outputs[0]
    stop_text = base.text[30:36]
    cases = [SamplingParams(temperature=0, max_tokens=n) for n in (1, 2, 7, 13)]
    cases += [
        SamplingParams(temperature=0, max_tokens=60, stop=[stop_text]),
        SamplingParams(temperature=0, max_tokens=60, stop=[stop_text], include_stop_str_in_output=True),
        SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[base.token_ids[20]]),
        SamplingParams(temperature=0, max_tokens=60, logprobs=2),
    ]
    for params in cases:
        want = plain.generate(REPEATING, params, use_tqdm=False)[0].outputs[0]
        got = spec.generate(REPEATING, params, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
            want.stop_reason,
        ), params
        if params.logprobs is not None:
            assert [e[t].logprob for e, t in zip(got.logprobs, got.token_ids)] == pytest.approx(
                [e[t].logprob for e, t in zip(want.logprobs, want.token_ids)], abs=1e-4
            )
            assert "".join(e[t].decoded_token for e, t in zip(got.logprobs, got.token_ids)) == got.text
    assert spec.llm_engine.stats.spec_num_accepted_tokens > 0


def test_preemption_abort_and_prefix_cache_leave_no_block(stories_path):
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    prompts = [REPEATING, REPEATING + " went", *PROMPTS[:3]]
    expected = [o.outputs[0].token_ids for o in LLM(stories_path).generate(prompts, params, use_tqdm=False)]
    small = LLM(stories_path, speculative_config=ngram(4), num_gpu_blocks_override=12, max_model_len=192)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    engine = small.llm_engine
    assert engine.stats.num_preemptions > 0 and engine.stats.prefix_cache_hits > 0
    engine.add_request("a", REPEATING, params)
    engine.add_request("b", PROMPTS[0], params)
    for _ in range(6):
        engine.step()
    engine.abort_request(["a", "b"])
    assert not engine.has_unfinished_requests() and engine.stats.num_kv_blocks_used == 0
    assert all(b.ref_count == 0 for b in engine.scheduler.block_manager.blocks)


def test_seeded_tokens_do_not_depend_on_the_batch(stories_path):
    llm = LLM(stories_path, speculative_config=ngram(3))
    seeded = SamplingParams(temperature=0.9, seed=11, max_tokens=50)
    alone = llm.generate(REPEATING, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=30) for s in range(3)]
    batched = (
        llm.generate([PROMPTS[0], REPEATING, PROMPTS[1], PROMPTS[2]], [others[0], seeded, *others[1:]], use_tqdm=False)[
            1
        ]
        .outputs[0]
        .token_ids
    )
    assert batched == alone


def _second_token_frequencies(llm: LLM, prompt: str, first: int, num: int, temperature: float) -> dict[int, int]:
    """How often each token came second among `num` seeded samples whose first token was `first` (the
    first is sampled by the prefill step; the second is the first one a draft can propose)."""
    params = [SamplingParams(temperature=temperature, seed=s, max_tokens=3, ignore_eos=True) for s in range(num)]
    counts: dict[int, int] = {}
    for out in llm.generate([prompt] * num, params, use_tqdm=False):
        tokens = out.outputs[0].token_ids
        if tokens[0] == first:
            counts[tokens[1]] = counts.get(tokens[1], 0) + 1
    return counts


def _fits(counts: dict[int, int], probs: torch.Tensor, num: int) -> bool:
    """Every token's frequency within 4.5 standard deviations of its probability (with a floor for the
    rare ones), and no token the distribution cannot give."""
    for token in set(counts) | set(torch.nonzero(probs > 0.01).flatten().tolist()):
        p = float(probs[token])
        sigma = math.sqrt(max(p * (1 - p), 1e-4) / num)
        if abs(counts.get(token, 0) / num - p) > 4.5 * sigma + 1e-3:
            return False
    return True


def test_sampled_tokens_keep_the_target_distribution(stories_path, monkeypatch):
    """After "Ben and Sue played. Ben and" and a sampled " S" (p = 0.37), the n-gram draft for the next
    token is "u" (p = 0.30); that token, verified against the draft, is distributed as the target's
    softmax(logits / T) (transformers' exact probabilities). A sampler that just accepted drafts would emit
    "u" every time, and the same check rejects it."""
    temperature, num, prompt = 1.0, 1800, "Ben and Sue played. Ben and"
    llm = LLM(stories_path, speculative_config=ngram(1), max_num_seqs=256)
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(prompt)
    first = propose_ngram(ids, 1, 1, 4)[0]  # " S"
    draft = propose_ngram([*ids, first], 1, 1, 4)[0]
    with torch.no_grad():
        logits = _hf_model(stories_path)(torch.tensor([[*ids, first]])).logits[0, -1].float()
    probs = (logits / temperature).softmax(-1)
    assert 0.1 < float(probs[draft]) < 0.95  # the draft is accepted sometimes and rejected sometimes
    counts = _second_token_frequencies(llm, prompt, first, num, temperature)
    taken = sum(counts.values())
    assert taken > 300 and _fits(counts, probs, taken), sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    stats = llm.llm_engine.stats
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens

    import mini_infer.spec_decode.rejection_sampler as rs

    original = rs._acceptance

    def always_accept(*args):
        accept, residual = original(*args)
        return torch.ones_like(accept), residual

    monkeypatch.setattr(rs, "_acceptance", always_accept)
    naive = _second_token_frequencies(LLM(stories_path, speculative_config=ngram(1)), prompt, first, 400, temperature)
    assert list(naive) == [draft] and not _fits(naive, probs, sum(naive.values()))


def test_rejection_sampler_against_sampling_from_the_target():
    """One sequence, two one-hot drafts over a 5-token vocabulary: the first emitted token is distributed as
    the first row's p, the second (given the first draft was accepted) as the second row's p."""
    vocab, draws = 5, 4000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 1.5, 0.2, 0.9, 0.1], [1.0, 0.0, 0.0, 0.0, 2.0]])
    p = logits.softmax(-1)
    drafts = [[1, 3]]
    first: dict[int, int] = {}
    second: dict[int, int] = {}
    for seed in range(draws):
        gens = [torch.Generator().manual_seed(seed * 3 + j) for j in range(3)]
        batch = build_sampling_batch(
            [SamplingParams(temperature=1.0)] * 3, [[0]] * 3, [[]] * 3, gens, vocab, torch.device("cpu")
        )
        out = rejection_sample(logits, batch, drafts, [None]).token_ids[0]
        first[out[0]] = first.get(out[0], 0) + 1
        if out[0] == 1:
            second[out[1]] = second.get(out[1], 0) + 1
    assert _fits(first, p[0], draws)
    assert _fits(second, p[1], sum(second.values()))
    greedy = build_sampling_batch(
        [SamplingParams(temperature=0)] * 3, [[0]] * 3, [[]] * 3, [None] * 3, vocab, torch.device("cpu")
    )
    assert rejection_sample(logits, greedy, [[0, 1]], [None]).token_ids == [[0, 1, 4]]  # all accepted + bonus
    assert rejection_sample(logits, greedy, [[0, 2]], [None]).token_ids == [[0, 1]]  # rejected at the second


def test_server_speculates_and_reports_it(stories_path):
    import httpx
    from test_server import ServerThread, scrape

    from mini_infer import EngineConfig, LLMEngine
    from mini_infer.async_engine import AsyncLLMEngine
    from mini_infer.entrypoints.openai.api_server import build_app

    spec = '{"method": "ngram", "num_speculative_tokens": 3}'
    config = EngineConfig(model=stories_path, dtype="float32", speculative_config=spec)
    engine = AsyncLLMEngine(LLMEngine(config))
    expected = LLM(stories_path).generate(REPEATING, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    with ServerThread(build_app(engine, ["m"])) as server:
        resp = httpx.post(
            server.url + "/v1/completions", timeout=60, json={"prompt": REPEATING, "max_tokens": 40, "temperature": 0}
        )
        assert resp.json()["choices"][0]["text"] == expected[0].outputs[0].text
        metrics = scrape(server.url)
    engine.shutdown()
    assert metrics["mini_infer:spec_decode_num_accepted_tokens_total"] > 0
    assert (
        metrics["mini_infer:spec_decode_num_draft_tokens_total"]
        >= metrics["mini_infer:spec_decode_num_accepted_tokens_total"]
    )
    assert metrics["mini_infer:spec_decode_num_accepted_tokens_per_pos_total{position=0}"] > 0


def draft(model: str, k: int) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k}


@pytest.mark.parametrize("k", [1, 4])
def test_the_model_as_its_own_draft_accepts_everything(stories_path, k):
    llm = LLM(stories_path, speculative_config=draft(stories_path, k))
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=80), use_tqdm=False)
    for prompt, out in zip(PROMPTS[:4], outs):
        expected = hf_greedy(stories_path, tokenizer.encode(prompt), 80)
        expected = expected[: expected.index(2) + 1] if 2 in expected else expected
        assert out.outputs[0].token_ids == expected
    stats = llm.llm_engine.stats
    assert stats.spec_num_draft_tokens > 50 and stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens


def test_a_draft_model_with_the_same_tokenizer(stories_path, qwen3_path):
    """tiny-random-qwen3 shares stories260K's tokenizer; its random drafts are rejected, the tokens stay
    the target's, under preemption and with a pool shared by both models' caches."""
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(stories_path).generate(PROMPTS[:4], params, use_tqdm=False)]
    llm = LLM(stories_path, speculative_config=draft(qwen3_path, 3), num_gpu_blocks_override=10, max_model_len=128)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], params, use_tqdm=False)] == expected
    stats = llm.llm_engine.stats
    assert stats.spec_num_draft_tokens > 0 and stats.num_preemptions > 0 and stats.num_kv_blocks_used == 0
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=30)
    alone = llm.generate(PROMPTS[1], seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate([PROMPTS[0], PROMPTS[1]], [params, seeded], use_tqdm=False)[1].outputs[0].token_ids == alone


def test_a_draft_with_another_vocabulary_is_refused(stories_path, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(stories_path, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 1024
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(stories_path, speculative_config=draft(str(other), 2))
    with pytest.raises(ValueError, match="needs 'model'"):
        LLM(stories_path, speculative_config={"method": "draft_model", "num_speculative_tokens": 2})


def test_a_verify_run_is_decode_rows_of_one_sequence():
    """A verify run (last token + k drafts) is laid out as 1 + k decode rows, row i reading the keys up to
    its own position through the sequence's block table, so the decode kernel computes each row as a
    plain decode there; prefill chunks after it keep their layout."""
    from mini_infer.scheduler import ScheduledSeq
    from mini_infer.sequence import Sequence
    from mini_infer.worker.step_inputs import build_step_inputs

    verify = Sequence("v", 0, list(range(20)), SamplingParams())
    verify.block_table = [7, 3]
    plain = Sequence("d", 0, list(range(5)), SamplingParams())
    plain.block_table = [1]
    chunk = Sequence("p", 0, list(range(40)), SamplingParams())
    chunk.block_table = [4, 5, 6]
    seqs = [
        ScheduledSeq(verify, 19, 4, True, 3, [101, 102, 103]),
        ScheduledSeq(plain, 4, 1, True, 0),
        ScheduledSeq(chunk, 16, 24, True, 0),
    ]
    inputs = build_step_inputs(seqs, 2, 16, {})
    assert inputs.num_decodes == 5
    assert inputs.query_lens.tolist() == [1, 1, 1, 1, 1, 24]
    assert inputs.seq_lens.tolist() == [20, 21, 22, 23, 5, 40]
    assert inputs.block_tables[:4, :2].tolist() == [[7, 3]] * 4 and inputs.block_tables[5].tolist() == [4, 5, 6]
    assert inputs.token_ids[:5].tolist() == [19, 101, 102, 103, 4]
    assert inputs.positions[:5].tolist() == [19, 20, 21, 22, 4]
    assert inputs.slot_mapping[:4].tolist() == [3 * 16 + 3, 3 * 16 + 4, 3 * 16 + 5, 3 * 16 + 6]
    assert inputs.logits_indices.tolist() == [0, 1, 2, 3, 4, 28]
