"""Incremental detokenization: streamed text is append-only, never ends in half a character,
and joins to exactly what the tokenizer decodes from all ids."""

from __future__ import annotations

from transformers import AutoTokenizer

from mini_infer import LLM, EngineConfig, LLMEngine, SamplingParams

REPLACEMENT = "\ufffd"


def stream(engine: LLMEngine, request_id: str, prompt, params: SamplingParams) -> tuple[list[str], list[int]]:
    engine.add_request(request_id, prompt, params)
    texts, ids = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            ids = out.outputs[0].token_ids
    return texts, ids


def test_random_qwen3_multibyte_streams_join_to_full_decode(qwen3_path):
    tok = AutoTokenizer.from_pretrained(qwen3_path)
    engine = LLMEngine(EngineConfig(model=qwen3_path))
    saw_partial = False
    for seed in range(6):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=60, ignore_eos=True)
        texts, ids = stream(engine, f"r{seed}", "Hello there", params)
        for prev, cur in zip(texts, texts[1:]):
            assert cur.startswith(prev)  # append-only: deltas are safe to stream
        assert texts[-1] == tok.decode(ids, skip_special_tokens=True)
        byte_tokens = [t for t in ids if 3 <= t <= 258]
        saw_partial |= len(byte_tokens) > 0
    assert saw_partial  # the random model did emit byte-fallback tokens


def test_utf8_split_across_byte_tokens(stories_path):
    """'é' and '日' are only reachable through byte-fallback tokens in this 512-token vocab."""
    tok = AutoTokenizer.from_pretrained(stories_path)
    llm = LLM(stories_path)
    text = "Lily saw a café and 日本 signs."
    ids = tok.encode(text, add_special_tokens=False)
    assert any(3 <= t <= 258 for t in ids)
    engine = llm.llm_engine
    # feed the ids one by one, as a generation would
    from mini_infer.detokenizer import DecodeWindow

    window, fed, pieces = DecodeWindow(), [], []
    for t in ids:
        fed.append(t)
        piece = engine.detokenizer.new_text(fed, window)
        assert REPLACEMENT not in piece
        pieces.append(piece)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_skip_special_tokens(stories_path):
    llm = LLM(stories_path)
    kept = llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=400, skip_special_tokens=False), use_tqdm=False
    )[0]
    skipped = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=400), use_tqdm=False)[0]
    assert kept.outputs[0].text.endswith("<s>")
    assert not skipped.outputs[0].text.endswith("<s>")


def test_final_only_text_decoded_at_the_end_equals_the_streamed_text(stories_path, qwen3_path):
    """Final-only requests without stop strings or logprobs decode their text once, at the end: the same
    text as streaming it token by token (byte-fallback runs, leading spaces, special tokens skipped)."""
    for path in (stories_path, qwen3_path):
        engine = LLMEngine(EngineConfig(model=path))
        llm = LLM(path)
        for seed in range(4):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=40, ignore_eos=True)
            streamed, ids = stream(engine, f"s{seed}", "Once upon a", params)
            final = llm.generate(["Once upon a"], params, use_tqdm=False)[0].outputs[0]
            assert final.token_ids == ids
            assert final.text == streamed[-1]
