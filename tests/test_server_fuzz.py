"""Property-based fuzzing of request bodies against the running server on loopback.

Every field of completions and chat gets either a plausible value or any JSON value (huge and
negative integers, NaN and infinities, strings, nested lists and objects). The invariant: a 4xx with
an OpenAI error body, or a valid answer (a whole stream when streaming); never a 5xx, never an error
event in a stream; and afterwards the server still answers a good request. Bounded in count and time
(a fixed seed, so CI runs the same examples every time).
"""

from __future__ import annotations

import collections
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from test_server import ServerThread

from mini_infer import EngineConfig, LLMEngine
from mini_infer.async_engine import AsyncLLMEngine
from mini_infer.entrypoints.openai.api_server import build_app

EXAMPLES = 150  # per endpoint: about 30 s on two CPU cores

ints = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30]))
floats = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf")]))
json_values = st.recursive(
    st.none() | st.booleans() | ints | floats | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
vocab_ids = st.integers(0, 150)  # tiny-random-qwen3's ids that exist
token_ids = st.lists(vocab_ids, max_size=6)
unit = st.floats(0.01, 1.0)
seeds = st.one_of(st.integers(-5, 5), st.sampled_from([2**63 - 1, -(2**63)]))

# Values a real client might send (boundaries included); each also has a hostile twin below.
SAMPLING = {
    "model": st.sampled_from(["m", None]),
    "max_tokens": st.integers(1, 8),
    "temperature": st.one_of(st.just(0.0), st.floats(0, 2)),
    "top_p": unit,
    "top_k": st.one_of(st.sampled_from([-1, 0, 1]), st.integers(1, 151)),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "seed": seeds,
    "stream": st.booleans(),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(vocab_ids.map(str), st.floats(-100, 100), max_size=3),
    "min_tokens": st.integers(0, 4),
    "ignore_eos": st.booleans(),
    "stop_token_ids": token_ids,
    "allowed_token_ids": st.lists(vocab_ids, min_size=1, max_size=6),
    "prompt_logprobs": st.integers(0, 3),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "priority": st.integers(-3, 3),
    "user": st.text(max_size=5),
}
PROMPTS = st.one_of(
    st.text(min_size=1, max_size=20),
    st.lists(vocab_ids, min_size=1, max_size=6),
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3),
)
COMPLETION_ONLY = {"echo": st.booleans(), "logprobs": st.integers(0, 5)}
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]),
            "content": st.one_of(
                st.text(max_size=20),
                st.lists(
                    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                    min_size=1,
                    max_size=2,
                ),
            ),
        }
    ),
    min_size=1,
    max_size=3,
)
CHAT_ONLY = {
    "max_completion_tokens": st.integers(1, 8),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "add_generation_prompt": st.booleans(),
    "response_format": st.just({"type": "text"}),
}
HOSTILE_ONLY = {
    "guided_json": json_values,
    "frobnicate": json_values,
    "suffix": st.text(max_size=3),
    "best_of": ints,
    "tools": json_values,
    "stream_options": json_values,
    "chat_template_kwargs": st.dictionaries(st.text(max_size=6), json_values, max_size=2),
}


def hostile(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A field that is plausible two times in three, any JSON value (or an extreme number) otherwise."""
    return st.one_of(plausible, plausible, json_values, ints, floats)


def bodies(required: dict, optional: dict) -> st.SearchStrategy:
    """Plausible bodies (they reach the engine), plausible ones with one hostile field (where a single
    bad value hides), and bodies with many hostile fields."""
    plausible = st.fixed_dictionaries(required, optional=optional)
    names = sorted({*required, *optional, *HOSTILE_ONLY})

    @st.composite
    def one_hostile(draw: st.DrawFn) -> dict:
        body = draw(plausible)
        name = draw(st.sampled_from(names))
        body[name] = draw(st.one_of(json_values, ints, floats))
        return body

    many_hostile = st.fixed_dictionaries(
        {k: hostile(v) for k, v in required.items()},
        optional={**{k: hostile(v) for k, v in optional.items()}, **HOSTILE_ONLY},
    )
    return st.one_of(plausible, one_hostile(), many_hostile)


COMPLETION = bodies({"prompt": PROMPTS}, {**SAMPLING, **COMPLETION_ONLY})
CHAT = bodies({"messages": MESSAGES}, {**SAMPLING, **CHAT_ONLY})


@pytest.fixture(scope="module")
def server(qwen3_path):
    config = EngineConfig(model=qwen3_path, max_model_len=48, num_gpu_blocks_override=256, max_seqs_per_request=8)
    engine = AsyncLLMEngine(LLMEngine(config))
    with ServerThread(build_app(engine, ["m"])) as running:
        running.client = httpx.Client(base_url=running.url, timeout=60)
        running.statuses = collections.Counter()
        yield running
    engine.shutdown()


def check(server, path: str, body: dict) -> None:
    content = json.dumps(body)  # NaN and Infinity go as JSON extensions, which the server's parser reads
    with server.client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as resp:
        raw = resp.read().decode()
    server.statuses[path, resp.status_code] += 1
    assert resp.status_code < 500, (resp.status_code, raw, body)
    if resp.status_code >= 400:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], raw
        return
    assert resp.status_code == 200, raw
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", raw
        for event in events[:-1]:
            assert "error" not in json.loads(event), (event, body)
    else:
        answer = json.loads(raw)
        assert answer["choices"] and "usage" in answer, raw


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@seed(12)
@FUZZ
@given(body=COMPLETION)
def test_fuzz_completions(server, body):
    check(server, "/v1/completions", body)


@seed(13)
@FUZZ
@given(body=CHAT)
def test_fuzz_chat(server, body):
    check(server, "/v1/chat/completions", body)


EXTREMES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    10**30,
    0.5,
    1e-30,
    1e30,
    float("nan"),
    float("inf"),
    -float("inf"),
    "",
    "x",
    [],
    [0],
    [10**6],
    [-100000],
    [2**64],
    ["a", 1],
    {},
    {"0": 1},
    {"999999": 1e30},
    [[1]],
]


@pytest.mark.parametrize(
    "path,base",
    [
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 1.0, "min_tokens": 1, "seed": 1}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 3,
                "temperature": 1.0,
                "min_tokens": 1,
                "logprobs": True,
            },
        ),
    ],
)
def test_every_field_with_every_extreme_value(server, path, base):
    """Where a single bad value hides: every field, alone, set to every extreme value, on a body that is
    otherwise good (it samples, is seeded and bans stop tokens for a while, so the values reach the engine)."""
    optional = {**SAMPLING, **(COMPLETION_ONLY if "prompt" in base else CHAT_ONLY), **HOSTILE_ONLY}
    for name in sorted({*base, *optional}):
        for value in EXTREMES:
            check(server, path, {**base, name: value})
            if name in ("seed", "n", "top_k", "stop_token_ids"):  # with a second sample, and streaming
                check(server, path, {**base, "n": 2, "stream": True, name: value})


def test_still_serves_after_fuzzing(server):
    print("fuzzed requests by (endpoint, status):", dict(server.statuses))
    for path in ("/v1/completions", "/v1/chat/completions"):  # the fuzzing reached the engine, not only the 400s
        assert server.statuses[path, 200] >= EXAMPLES // 5, server.statuses
    resp = server.client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
    assert server.client.get("/health").status_code == 200
