"""Structured outputs through xgrammar: every constrained output validates, unconstrained rows of the same
batch keep transformers' greedy tokens, finish reasons, bad grammars, speculative decoding, the server.

Outputs are parsed with strict `json.loads`: the grammars here compile with disable_any_whitespace or
patterned strings, and xgrammar's JSON grammar escapes control characters inside strings (it follows
the JSON spec), so a strict parse is the right check (docs/structured_outputs.md).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import hf_greedy

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from mini_infer import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from mini_infer.sampler import apply_token_bitmask  # noqa: E402
from mini_infer.spec_decode.config import SpeculativeConfig  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"town": {"type": "string", "pattern": "^[A-Z][a-z]{0,5}$"}},
            "required": ["town"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "pet", "home"],
    "additionalProperties": False,
}
REGEX = r"(red|blue) [0-9]{2,3}!"
CHOICES = ["happy", "sad", "very sleepy"]
GRAMMAR = 'root ::= "(" num (" + " num){0,3} ")"\nnum ::= [1-9] [0-9]?'
GRAMMAR_RE = r"\([1-9][0-9]?( \+ [1-9][0-9]?){0,3}\)"


def specs() -> list[StructuredOutputsParams]:
    return [
        StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
        StructuredOutputsParams(regex=REGEX),
        StructuredOutputsParams(choice=CHOICES),
        StructuredOutputsParams(grammar=GRAMMAR),
        StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
    ]


def check(spec: StructuredOutputsParams, out) -> None:
    """The output validates; an unbounded spec (any JSON object) may also run into max_tokens."""
    text = out.text
    if spec.json_object and out.finish_reason == "length":
        assert text.startswith("{"), text
        return
    assert out.finish_reason == "stop", (spec, text)
    if spec.json is not None:
        jsonschema.validate(json.loads(text), SCHEMA)
    elif spec.json_object:
        assert isinstance(json.loads(text), dict), text
    elif spec.regex is not None:
        assert re.fullmatch(REGEX, text), text
    elif spec.choice is not None:
        assert text in CHOICES, text
    else:
        assert re.fullmatch(GRAMMAR_RE, text), text


@pytest.fixture(scope="module")
def stories(stories_path):
    return LLM(stories_path, dtype="float32", max_model_len=256)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_batch_with_unconstrained_rows(stories, stories_path, temperature):
    prompts = ["Once upon a time", "The cat sat on the"]
    constrained = [
        SamplingParams(temperature=temperature, seed=i, max_tokens=120, structured_outputs=s)
        for i, s in enumerate(specs())
    ]
    plain = SamplingParams(temperature=0, max_tokens=12)
    outs = stories.generate([prompts[0]] * len(constrained) + prompts, constrained + [plain, plain], use_tqdm=False)
    for params, out in zip(constrained, outs):
        check(params.structured_outputs, out.outputs[0])
    for out in outs[len(constrained) :]:
        assert out.outputs[0].token_ids == hf_greedy(stories_path, out.prompt_token_ids, 12)


def test_async_scheduling_gives_the_synchronous_tokens(stories, stories_path):
    """With async scheduling the masks are filled after the step's forward pass is queued and the step
    before is read back then: the tokens are those of an engine that reads every step back first."""
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs=s) for i, s in enumerate(specs())
    ]
    params += [SamplingParams(temperature=1.0, seed=9, max_tokens=20), SamplingParams(temperature=0, max_tokens=20)]
    prompts = ["Once upon a time"] * len(params)
    sync = LLM(stories_path, dtype="float32", max_model_len=256, async_scheduling=False)
    expected = [o.outputs[0].token_ids for o in sync.generate(prompts, params, use_tqdm=False)]
    assert stories.llm_engine.config.async_scheduling
    assert [o.outputs[0].token_ids for o in stories.generate(prompts, params, use_tqdm=False)] == expected


def test_qwen3_tokenizer(qwen3_path):
    """A noise model with a byte-level BPE vocabulary: the grammar alone makes the output valid."""
    llm = LLM(qwen3_path, dtype="float32", max_model_len=512)
    params = [
        SamplingParams(temperature=t, seed=3, max_tokens=200, structured_outputs=s) for s in specs() for t in (0, 1)
    ]
    outs = llm.generate(["hello"] * len(params), params, use_tqdm=False)
    for p, out in zip(params, outs):
        check(p.structured_outputs, out.outputs[0])


def test_finish_reasons_and_bad_grammars(stories):
    long = SamplingParams(temperature=0, max_tokens=3, structured_outputs=StructuredOutputsParams(regex="(ab){20}"))
    choice = SamplingParams(temperature=0, max_tokens=50, structured_outputs=StructuredOutputsParams(choice=["x"]))
    bad = SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="does not compile"):
        stories.llm_engine.check_structured_outputs(bad)
    outs = stories.generate(["Once"] * 4, [long, choice, bad, SamplingParams(max_tokens=4)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "length" and "abababab".startswith(outs[0].outputs[0].text)
    assert (outs[1].outputs[0].text, outs[1].outputs[0].finish_reason) == ("x", "stop")
    assert outs[2].outputs[0].finish_reason == "error"
    assert outs[3].outputs[0].finish_reason == "length" and len(outs[3].outputs[0].token_ids) == 4
    engine = stories.llm_engine  # aborted while its grammar compiles: gone, nothing left behind
    engine.add_request("w", "Once", SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]{7}")))
    engine.abort_request("w")
    assert not engine.has_unfinished_requests() and not engine.step()
    for kwargs in ({}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"json": "{nope"}):
        with pytest.raises(ValueError):
            StructuredOutputsParams(**kwargs)


def test_speculative_decoding_keeps_outputs_valid(stories_path):
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)
    llm = LLM(stories_path, dtype="float32", max_model_len=256, speculative_config=spec)
    # the prompt repeats what the grammar wants, so the drafts are sometimes right and sometimes not
    prompt = 'Once {"name":"ab","pet":"cat","home":{"town":"Xy"}} and red 12! red 12! (1 + 2) (1 + 2)'
    params = [
        SamplingParams(temperature=t, seed=5, max_tokens=120, structured_outputs=s) for s in specs() for t in (0, 1)
    ]
    outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    for p, out in zip(params, outs):
        check(p.structured_outputs, out.outputs[0])
    assert llm.llm_engine.stats.spec_num_draft_tokens > 0


def test_bitmask_matches_xgrammar():
    torch.manual_seed(0)
    vocab = 77
    mask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(5, vocab)
    rows = torch.tensor([0, 2, 4])
    ours = apply_token_bitmask(logits, rows, mask)
    ref, full = logits.clone(), torch.full((5, mask.shape[1]), -1, dtype=torch.int32)
    full[rows] = mask
    xgr.apply_token_bitmask_inplace(ref, full)
    assert torch.equal(ours, ref)


# ---- the server, through the official openai client ------------------------------------------
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_server(stories_path):
    openai = pytest.importorskip("openai")
    from test_server import ServerThread

    from mini_infer import EngineConfig, LLMEngine
    from mini_infer.async_engine import AsyncLLMEngine
    from mini_infer.entrypoints.openai.api_server import build_app

    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=stories_path, dtype="float32", max_model_len=256)))
    try:
        with ServerThread(build_app(engine, ["stories"], chat_template=TEMPLATE)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            schema = {"name": "pet", "schema": SCHEMA}
            out = client.completions.create(
                model="stories",
                prompt="Once upon a time",
                max_tokens=40,
                temperature=0,
                extra_body={"response_format": {"type": "json_schema", "json_schema": schema}},
            ).choices[0]
            # any whitespace (the default): this greedy model spews it, so only the start is checked
            assert out.text.startswith("{") and (out.finish_reason == "length" or json.loads(out.text))
            out = client.completions.create(
                model="stories",
                prompt="Once upon a time",
                max_tokens=120,
                extra_body={"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
            ).choices[0]
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), SCHEMA)
            chat = client.chat.completions.create(
                model="stories",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=60,
                extra_body={"guided_choice": CHOICES},
            ).choices[0]
            assert chat.message.content in CHOICES and chat.finish_reason == "stop"
            chat = client.chat.completions.create(
                model="stories",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=30,
                temperature=0,
                response_format={"type": "json_object"},
            ).choices[0]
            assert chat.message.content.startswith("{")
            out = client.completions.create(
                model="stories", prompt="Once", max_tokens=30, extra_body={"structured_outputs": {"regex": REGEX}}
            ).choices[0]
            assert re.fullmatch(REGEX, out.text)
            with pytest.raises(openai.BadRequestError, match="does not compile"):
                client.completions.create(
                    model="stories", prompt="Once", max_tokens=5, extra_body={"guided_grammar": "root ::= ("}
                )
            out = client.completions.create(model="stories", prompt="Once", max_tokens=4)  # still serving
            assert out.choices[0].finish_reason == "length"
    finally:
        engine.shutdown()
