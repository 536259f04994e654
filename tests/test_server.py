"""The OpenAI-compatible server, in-process on 127.0.0.1, driven by the official `openai` client.

One engine per model serves every test of this module; each test checks against offline
`LLM.generate` on the same model, so "right text" means "what the engine gives without a server".
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from mini_infer import LLM, EngineConfig, LLMEngine, SamplingParams
from mini_infer.async_engine import AsyncLLMEngine
from mini_infer.entrypoints.openai.api_server import build_app
from mini_infer.model_loader import PRESETS_DIR

NUM_BLOCKS = 1024
STORY_PROMPTS = ["Once upon a time", "The cat sat on the", "Lily and Tom went to the park.", "One day, a little bird"]


class ServerThread:
    """uvicorn on a socket bound to 127.0.0.1:0, in a daemon thread, stopped on exit."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as `mini-infer serve` does
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _serve(model_path: str, name: str, **app_kwargs):
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=model_path, num_gpu_blocks_override=NUM_BLOCKS)))
    app = build_app(engine, [name], **app_kwargs)
    return engine, app


@pytest.fixture(scope="module")
def stories(stories_path):
    engine, app = _serve(stories_path, "stories")
    with ServerThread(app) as server:
        server.engine = engine
        yield server
    engine.shutdown()


@pytest.fixture(scope="module")
def qwen(qwen3_path):
    engine, app = _serve(qwen3_path, "qwen")
    with ServerThread(app) as server:
        server.engine = engine
        yield server
    engine.shutdown()


@pytest.fixture(scope="module")
def offline_stories(stories_path):
    return LLM(stories_path, num_gpu_blocks_override=NUM_BLOCKS)


@pytest.fixture(scope="module")
def client(stories):
    return openai.OpenAI(base_url=stories.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(llm: LLM, prompts, max_tokens: int, **kwargs) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def scrape(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value}, parsed by prometheus-client's own parser."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


# ---- completions ----------------------------------------------------------------------------
def test_health_and_models(stories, client):
    assert httpx.get(stories.url + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == ["stories"]


def test_completion_greedy_equals_offline(client, offline_stories):
    expected = greedy(offline_stories, STORY_PROMPTS[0], 24)[0]
    resp = client.completions.create(model="stories", prompt=STORY_PROMPTS[0], max_tokens=24, temperature=0)
    choice = resp.choices[0]
    assert choice.text == expected and choice.finish_reason == "length"
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion" and resp.created > 0
    assert resp.usage.completion_tokens == 24
    assert resp.usage.prompt_tokens == len(offline_stories.get_tokenizer().encode(STORY_PROMPTS[0]))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 24


def test_completion_stream_deltas_join_and_usage(client, offline_stories):
    expected = greedy(offline_stories, STORY_PROMPTS[1], 20)[0]
    chunks = list(
        client.completions.create(
            model="stories",
            prompt=STORY_PROMPTS[1],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == expected
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_batch_of_prompts_and_token_ids(client, offline_stories):
    tokenizer = offline_stories.get_tokenizer()
    expected = greedy(offline_stories, STORY_PROMPTS[:2], 12)
    resp = client.completions.create(model="stories", prompt=STORY_PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == expected
    ids = [tokenizer.encode(p) for p in STORY_PROMPTS[:2]]
    resp = client.completions.create(model="stories", prompt=ids[0], max_tokens=12, temperature=0)
    assert resp.choices[0].text == expected[0]
    resp = client.completions.create(model="stories", prompt=ids, max_tokens=12, temperature=0)
    assert [c.text for c in resp.choices] == expected
    assert resp.usage.prompt_tokens == sum(len(i) for i in ids)


def test_completion_n2_and_echo(client):
    resp = client.completions.create(
        model="stories", prompt=STORY_PROMPTS[0], max_tokens=10, n=2, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.finish_reason in ("length", "stop") for c in resp.choices)
    assert 2 <= resp.usage.completion_tokens <= 20
    chunks = list(
        client.completions.create(
            model="stories", prompt=STORY_PROMPTS[0], max_tokens=8, n=2, temperature=1.0, seed=7, stream=True
        )
    )
    joined = {0: "", 1: ""}
    for c in chunks:
        joined[c.choices[0].index] += c.choices[0].text
    assert joined[0] and joined[1]
    echo = client.completions.create(model="stories", prompt=STORY_PROMPTS[2], max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model="stories", prompt=STORY_PROMPTS[2], max_tokens=5, temperature=0)
    assert echo.choices[0].text == STORY_PROMPTS[2] + plain.choices[0].text


def test_completion_stop_string(client, offline_stories):
    full = greedy(offline_stories, STORY_PROMPTS[0], 30)[0]
    stop = "Lily"
    assert stop in full, full
    expected = greedy(offline_stories, STORY_PROMPTS[0], 30, stop=[stop])[0]
    assert expected == full[: full.index(stop)]
    resp = client.completions.create(
        model="stories", prompt=STORY_PROMPTS[0], max_tokens=30, temperature=0, stop=[stop]
    )
    assert resp.choices[0].text == expected
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="stories", prompt=STORY_PROMPTS[0], max_tokens=30, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == expected


def test_completion_logprobs(client, offline_stories):
    resp = client.completions.create(model="stories", prompt=STORY_PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0 and len(top) >= 3
        assert token_lp == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3)
    offline = offline_stories.generate(STORY_PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    expected = [entry[t].logprob for t, entry in zip(offline.token_ids, offline.logprobs)]
    assert lp.tokens == [entry[t].decoded_token for t, entry in zip(offline.token_ids, offline.logprobs)]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-5)
    streamed = [
        c.choices[0].logprobs
        for c in client.completions.create(
            model="stories", prompt=STORY_PROMPTS[0], max_tokens=6, temperature=0, logprobs=3, stream=True
        )
    ]
    assert [t for s in streamed for t in s.token_logprobs] == pytest.approx(expected, abs=1e-5)


# ---- chat -------------------------------------------------------------------------------------
def test_chat_non_stream_and_stream(qwen, qwen3_path):
    client = openai.OpenAI(base_url=qwen.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story"}]
    offline = LLM(qwen3_path, num_gpu_blocks_override=64).chat(
        messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False
    )[0]
    resp = client.chat.completions.create(model="qwen", messages=messages, max_tokens=12, temperature=0)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == offline.outputs[0].text
    assert resp.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert resp.usage.completion_tokens == len(offline.outputs[0].token_ids)

    stream = list(
        client.chat.completions.create(
            model="qwen",
            messages=messages,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == offline.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert finishes == [resp.choices[0].finish_reason]
    assert stream[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_chat_logprobs_and_n(qwen):
    client = openai.OpenAI(base_url=qwen.url + "/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="qwen",
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
    resp = client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]


# ---- many clients -------------------------------------------------------------------------------
def test_100_concurrent_streams_share_steps(stories, offline_stories):
    prompts = [f"{STORY_PROMPTS[i % 4]} {word}" for i, word in enumerate(("big", "small", "red", "happy", "sad") * 20)]
    expected = greedy(offline_stories, prompts, 16)
    steps_before = stories.engine.num_steps

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        text, finish = "", None
        stream = await client.completions.create(
            model="stories", prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main() -> list[tuple[str, str | None]]:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=200), timeout=120)
        async with openai.AsyncOpenAI(
            base_url=stories.url + "/v1", api_key="x", http_client=http, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    assert [t for t, _ in results] == expected
    assert all(f in ("length", "stop") for _, f in results)
    # Continuous batching: 100 requests of <= 16 tokens took far fewer than 100 * 16 steps.
    assert stories.engine.num_steps - steps_before < 400


# ---- bad input --------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (path, raw body or JSON, status, error param or None, words the message must hold)
    ("/v1/completions", "{not json", 400, None, "malformed JSON"),
    ("/v1/completions", "[1, 2]", 400, None, ""),
    ("/v1/completions", {"model": "stories"}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "n must"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {"prompt": ""}, 400, None, "empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": "hi " * 600}, 400, None, "max_model_len"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 600}, 400, None, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 100000]}, 400, None, "token ids"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "gpt-4"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "max_tokens": 600}, 400, None, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "messages", "role"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "nope"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, None, "chat template"),
    ("/v1/nothing-here", {}, 404, None, ""),
]


@pytest.mark.parametrize(
    "path,body,status,param,words", BAD_REQUESTS, ids=[f"{i}-{r[2]}-{r[4] or r[0]}" for i, r in enumerate(BAD_REQUESTS)]
)
def test_bad_input_gets_openai_error(stories, path, body, status, param, words):
    content = body if isinstance(body, str) else json.dumps(body)
    resp = httpx.post(stories.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and words in error["message"]
    if param is not None:
        assert error["param"] == param


def test_bad_requests_do_not_disturb_a_running_one(stories, client, offline_stories):
    expected = greedy(offline_stories, STORY_PROMPTS[3], 60, ignore_eos=True)[0]
    result: dict[str, str] = {}

    def long_request() -> None:
        stream = client.completions.create(
            model="stories",
            prompt=STORY_PROMPTS[3],
            max_tokens=60,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        result["text"] = "".join(c.choices[0].text for c in stream)

    worker = threading.Thread(target=long_request)
    worker.start()
    for _, body, status, _, _ in BAD_REQUESTS[:16]:
        content = body if isinstance(body, str) else json.dumps(body)
        resp = httpx.post(
            stories.url + "/v1/completions", content=content, headers={"content-type": "application/json"}, timeout=30
        )
        assert resp.status_code in (status, 404)
    worker.join(timeout=120)
    assert result["text"] == expected
    # And the server still answers correctly afterwards.
    resp = client.completions.create(model="stories", prompt=STORY_PROMPTS[0], max_tokens=24, temperature=0)
    assert resp.choices[0].text == greedy(offline_stories, STORY_PROMPTS[0], 24)[0]
    assert not stories.engine.engine.has_unfinished_requests()


# ---- disconnects and aborts ------------------------------------------------------------------
def _wait_idle(url: str, timeout: float) -> tuple[float, dict[str, float]]:
    start = time.monotonic()
    while True:
        m = scrape(url)
        if m["mini_infer:num_requests_running"] == 0 and m["mini_infer:kv_cache_usage_perc"] == 0:
            return time.monotonic() - start, m
        if time.monotonic() - start > timeout:
            return time.monotonic() - start, m
        time.sleep(0.02)


def _wait_running(url: str) -> None:
    deadline = time.monotonic() + 10
    while scrape(url)["mini_infer:num_requests_running"] < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_blocks(stories, stream):
    aborted_before = scrape(stories.url).get("mini_infer:request_success_total{finished_reason=abort}", 0)
    body = json.dumps(
        {"model": "stories", "prompt": STORY_PROMPTS[2], "max_tokens": 400, "ignore_eos": True, "stream": stream}
    ).encode()
    host, port = stories.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        if stream:
            received = b""
            while b"data:" not in received:
                received += conn.recv(4096)
        _wait_running(stories.url)
        assert scrape(stories.url)["mini_infer:kv_cache_usage_perc"] > 0
    closed_at = time.monotonic()  # the client went away mid-response
    elapsed, metrics = _wait_idle(stories.url, timeout=5)
    assert metrics["mini_infer:num_requests_running"] == 0
    assert metrics["mini_infer:kv_cache_usage_perc"] == 0
    assert elapsed < 1.0 and time.monotonic() - closed_at < 1.5
    assert metrics["mini_infer:request_success_total{finished_reason=abort}"] == aborted_before + 1
    assert not stories.engine.engine.has_unfinished_requests()


def test_async_engine_generate_and_abort(stories):
    engine = stories.engine

    async def main() -> tuple[int, int]:
        params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        outputs = []
        async for out in engine.generate(STORY_PROMPTS[0], SamplingParams(temperature=0, max_tokens=5), "g1"):
            outputs.append(out)
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 5

        seen = 0

        async def consume() -> None:
            nonlocal seen
            async for _ in engine.generate(STORY_PROMPTS[1], params, "g2"):
                seen += 1

        task = asyncio.ensure_future(consume())
        while seen < 3:
            await asyncio.sleep(0.005)
        await engine.abort("g2")
        await asyncio.wait_for(task, 5)  # the iterator ends once aborted
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("g3", "", params)
        return seen, len(outputs)

    seen, _ = asyncio.run(main())
    assert seen < 300
    deadline = time.monotonic() + 2
    while engine.engine.has_unfinished_requests():
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ---- metrics, API key, tokenizer-less models, bench ------------------------------------------
def test_metrics_names_and_values(stories, client):
    client.completions.create(model="stories", prompt=STORY_PROMPTS[0], max_tokens=4, temperature=0)
    m = scrape(stories.url)
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "num_preemptions_total",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "e2e_request_latency_seconds_count",
    ):
        assert f"mini_infer:{name}" in m, name
    assert m["mini_infer:request_success_total{finished_reason=length}"] >= 1
    assert m["mini_infer:generation_tokens_total"] >= 4
    assert m["mini_infer:time_to_first_token_seconds_count"] >= 1
    assert m["mini_infer:e2e_request_latency_seconds_count"] >= 1
    assert m["mini_infer:inter_token_latency_seconds_count"] >= 3
    text = httpx.get(stories.url + "/metrics").text
    assert 'mini_infer:num_requests_running{model_name="stories"}' in text


def test_api_key_enforced(stories):
    app = build_app(stories.engine, ["stories"], api_key="sekret")
    with ServerThread(app) as keyed:
        assert httpx.get(keyed.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            resp = httpx.post(keyed.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert resp.status_code == 401
            assert resp.json()["error"]["type"] == "authentication_error"
        # Checked before the body is read: malformed JSON without a key is still a 401.
        assert httpx.post(keyed.url + "/v1/completions", content="{oops").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sekret", max_retries=0)
        resp = good.completions.create(model="stories", prompt="Once", max_tokens=2)
        assert resp.usage.completion_tokens == 2


def test_tokenizer_less_model_takes_token_ids(tmp_path):
    # A folder with only config.json: random weights and no tokenizer, like the GPU benchmark's 8B preset.
    (tmp_path / "config.json").write_text((PRESETS_DIR / "tiny-llama.json").read_text())
    engine = AsyncLLMEngine(
        LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", num_gpu_blocks_override=64))
    )
    assert engine.tokenizer is None
    with ServerThread(build_app(engine, ["dummy"])) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        resp = client.completions.create(
            model="dummy", prompt=[5, 6, 7, 8], max_tokens=7, extra_body={"ignore_eos": True}
        )
        assert resp.usage.prompt_tokens == 4 and resp.usage.completion_tokens == 7
        chunks = list(
            client.completions.create(
                model="dummy",
                prompt=[5, 6, 7],
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        # one chunk per step, unless the client reads slower than the engine steps: then deltas merge
        assert 1 <= len([c for c in chunks if c.choices]) <= 5 and chunks[-1].usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError, match="tokenizer"):
            client.completions.create(model="dummy", prompt="text", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="tokenizer"):
            client.chat.completions.create(model="dummy", messages=[{"role": "user", "content": "x"}])
    engine.shutdown()


def test_bench_serve_against_server(stories, tmp_path):
    import argparse

    from mini_infer.bench.serve import add_bench_serve_arguments, run_bench_serve

    out = tmp_path / "bench.json"
    args = add_bench_serve_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--base-url",
            stories.url,
            "--num-prompts",
            "12",
            "--random-input-len",
            "20",
            "--random-output-len",
            "8",
            "--random-prompt-format",
            "token-ids",
            "--ignore-eos",
            "--sweep",
            "40,inf",
            "--disable-tqdm",
            "--goodput",
            "ttft:60000",
            "--result-file",
            str(out),
        ]
    )
    assert run_bench_serve(args) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "stories" and len(data["runs"]) == 2
    for run in data["runs"]:
        assert run["completed"] == 12 and run["failed"] == 0
        assert run["total_output_tokens"] == 12 * 8 and run["total_input_tokens"] == 12 * 20
        assert run["request_throughput"] > 0 and run["median_ttft_ms"] > 0 and run["median_tpot_ms"] > 0
        assert run["request_goodput"] == pytest.approx(run["request_throughput"])
    chat = add_bench_serve_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--base-url",
            stories.url,
            "--endpoint",
            "/v1/completions",
            "--num-prompts",
            "4",
            "--random-input-len",
            "10",
            "--random-output-len",
            "4",
            "--disable-tqdm",
            "--request-rate",
            "100",
        ]
    )
    assert run_bench_serve(chat) == 0


def test_bench_serve_jsonl_on_chat(qwen, tmp_path):
    import argparse

    from mini_infer.bench.serve import add_bench_serve_arguments, run_bench_serve

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Tell me a story", "max_tokens": 6}\n"Hello there"\n')
    out = tmp_path / "chat.json"
    args = add_bench_serve_arguments(argparse.ArgumentParser()).parse_args(
        [
            "--base-url",
            qwen.url,
            "--endpoint",
            "/v1/chat/completions",
            "--dataset",
            "jsonl",
            "--dataset-path",
            str(data),
            "--num-prompts",
            "5",
            "--random-output-len",
            "4",
            "--ignore-eos",
            "--disable-tqdm",
            "--result-file",
            str(out),
        ]
    )
    assert run_bench_serve(args) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 5 and result["total_output_tokens"] == 6 + 4 + 6 + 4 + 6
    assert result["request_rate"] == "inf"


def test_bench_serve_statistics():
    from mini_infer.bench.serve import _percentile, parse_goodput

    assert _percentile([], 50) == 0.0
    assert _percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert _percentile([5.0, 1.0, 3.0], 100) == 5.0
    assert parse_goodput(["ttft:200", "tpot:20"]) == {"ttft": 200.0, "tpot": 20.0}
    with pytest.raises(SystemExit):
        parse_goodput(["latency:5"])
