"""No single request takes the engine down or freezes other users; the OpenAI surface refuses what it
cannot honour with a 400 naming the field, and the vLLM fields clients rely on work.

The server runs in-process on loopback (stories260K with max_model_len 64, so no request is long); the
oracle for prompt logprobs is transformers on the same weights.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import PROMPTS, _hf_model
from test_server import ServerThread, scrape

from mini_infer import LLM, EngineConfig, LLMEngine, SamplingParams
from mini_infer.async_engine import AsyncLLMEngine
from mini_infer.entrypoints.openai.api_server import build_app, host_allowed

MAX_LEN = 64


@pytest.fixture(scope="module")
def server(stories_path):
    engine = AsyncLLMEngine(
        LLMEngine(
            EngineConfig(model=stories_path, max_model_len=MAX_LEN, num_gpu_blocks_override=512, max_seqs_per_request=8)
        )
    )
    with ServerThread(build_app(engine, ["stories"])) as running:
        running.engine = engine
        yield running
    engine.shutdown()


def post(server, body, path="/v1/completions", **kwargs) -> httpx.Response:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(
        server.url + path,
        content=content,
        timeout=60,
        headers={"content-type": "application/json", **kwargs.pop("headers", {})},
        **kwargs,
    )


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None, words: str = "") -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error
    if param is not None:
        assert error["param"] == param, error


def assert_still_serves(server) -> None:
    resp = post(server, {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 5
    assert httpx.get(server.url + "/health").status_code == 200


# ---- the requests that used to kill the engine ---------------------------------------------------
KILLERS = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 2**64 - 1, "n": 2}, "seed"),
    ({"top_k": 2**63}, "top_k"),
    ({"stop_token_ids": [999999], "min_tokens": 2}, "stop_token_ids"),
    ({"stop_token_ids": [-100000], "min_tokens": 2}, "stop_token_ids"),
]


@pytest.mark.parametrize("fields,param", KILLERS, ids=[p for _, p in KILLERS])
def test_former_engine_killers_are_400s(server, fields, param):
    resp = post(server, {"prompt": "Once upon a time", "max_tokens": 4, **fields})
    assert_openai_error(resp, 400, param, param)
    assert_still_serves(server)


def test_extreme_valid_seeds_work(server):
    for seed in (2**63 - 1, -(2**63)):
        resp = post(server, {"prompt": "Once", "max_tokens": 3, "n": 2, "seed": seed, "temperature": 1.0})
        assert resp.status_code == 200, resp.text


BAD_VALUES = [
    # (body fields, status, param, words)
    ({"top_k": 513}, 400, "top_k", "vocabulary"),
    ({"logit_bias": {"600": 5}}, 400, "logit_bias", "vocabulary"),
    ({"logit_bias": {"5": 500}}, 400, "logit_bias", "logit_bias"),
    ({"logit_bias": {"five": 1}}, 400, "logit_bias", "token ids"),
    ({"allowed_token_ids": [5, 10**6]}, 400, "allowed_token_ids", "vocabulary"),
    ({"allowed_token_ids": []}, 400, "allowed_token_ids", "allowed_token_ids"),
    ({"n": 9}, 400, "n", "max_seqs_per_request"),
    ({"n": 200000}, 400, "n", "max_seqs_per_request"),
    ({"logprobs": 21}, 400, "logprobs", "max_logprobs"),
    ({"prompt_logprobs": 21}, 400, "prompt_logprobs", "max_logprobs"),
    ({"stream": "yes"}, 400, "stream", "boolean"),
    ({"stream": 1}, 400, "stream", "boolean"),
    ({"n": 2.0}, 400, "n", "integer"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({"guided_json": "{not json"}, 400, "guided_json", "not valid JSON"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, 400, "structured_outputs", "exactly one"),
    ({"guided_regex": "(unclosed"}, 400, "structured_outputs", "does not compile"),
    ({"guided_whitespace_pattern": " "}, 400, "guided_whitespace_pattern", "not supported"),
    ({"use_beam_search": True}, 400, "use_beam_search", "not supported"),
    ({"frobnicate": 3}, 400, None, "frobnicate"),
    ({"stop": ["x" * 2000]}, 400, "stop", "stop"),
    ({"stop": 5}, 400, "stop", "stop"),
]


@pytest.mark.parametrize("fields,status,param,words", BAD_VALUES, ids=[str(i) for i in range(len(BAD_VALUES))])
def test_values_the_engine_cannot_honour(server, fields, status, param, words):
    assert_openai_error(post(server, {"prompt": "Once upon a time", "max_tokens": 4, **fields}), status, param, words)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty", "min_p"])
def test_non_finite_numbers(server, field, value):
    body = f'{{"prompt": "Once", "max_tokens": 2, "{field}": {value}}}'  # json.loads reads these
    assert_openai_error(post(server, body), 400, field, field)


def test_chat_refuses_what_it_does_not_implement(server):
    base = {"messages": [{"role": "user", "content": "hi"}]}
    for fields, param in (
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, None),
        ({"logprobs": "yes"}, "logprobs"),
    ):
        assert_openai_error(post(server, {**base, **fields}, "/v1/chat/completions"), 400, param)


def test_offline_sampling_params_refuse_the_same(stories_path):
    for kwargs in (
        dict(seed=2**64),
        dict(temperature=math.nan),
        dict(top_p=math.inf),
        dict(n=True),
        dict(logit_bias={1: 1000}),
        dict(allowed_token_ids=[]),
        dict(stop_token_ids=[1.5]),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
    llm = LLM(stories_path, max_model_len=MAX_LEN, max_seqs_per_request=4)
    for kwargs in (
        dict(top_k=10**6),
        dict(stop_token_ids=[999999], min_tokens=1),
        dict(n=5),
        dict(logit_bias={512: 1.0}),
        dict(logprobs=100),
    ):
        with pytest.raises(ValueError):
            llm.generate("Once", SamplingParams(max_tokens=2, **kwargs), use_tqdm=False)
    assert llm.generate("Once", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


# ---- HTTP-level defences -----------------------------------------------------------------------
def test_request_body_limit(stories_path, server):
    app = build_app(server.engine, ["stories"], max_request_body_bytes=10_000)
    with ServerThread(app) as small:
        big = json.dumps({"prompt": "x" * 20_000})
        assert_openai_error(post(small, big), 413, words="10000 bytes")

        def chunked():  # no Content-Length: the limit holds while the body streams in
            yield big[:5000].encode()
            yield big[5000:].encode()

        resp = httpx.post(
            small.url + "/v1/completions", content=chunked(), timeout=30, headers={"content-type": "application/json"}
        )
        assert_openai_error(resp, 413, words="10000 bytes")
        assert post(small, {"prompt": "Once", "max_tokens": 2}).status_code == 200


def test_host_header_check_against_dns_rebinding(server):
    def with_host(host: str) -> int:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return int(conn.recv(4096).split(b" ", 2)[1])

    assert with_host("evil.example.com") == 403
    assert with_host(f"evil.example.com:{server.url.rsplit(':', 1)[1]}") == 403
    for ok in ("127.0.0.1", "localhost:8000", "[::1]:8000", "10.1.2.3"):
        assert with_host(ok) == 200, ok
    assert host_allowed("api.example.com:443", ["api.example.com"])
    assert not host_allowed("evil.com", ["api.example.com"])
    assert host_allowed("anything", ["*"])


def test_docs_off_unless_asked_and_no_path_leaks(server, stories_path):
    assert httpx.get(server.url + "/docs").status_code == 404
    assert httpx.get(server.url + "/openapi.json").status_code == 404
    models = httpx.get(server.url + "/v1/models").json()
    assert stories_path not in json.dumps(models) and models["data"][0]["root"] == "stories"
    assert stories_path not in httpx.get(server.url + "/metrics").text
    with ServerThread(build_app(server.engine, ["stories"], enable_docs=True)) as documented:
        assert httpx.get(documented.url + "/openapi.json").status_code == 200


# ---- fault isolation ---------------------------------------------------------------------------
def _fail_on(engine: LLMEngine, monkeypatch, marker_token: int) -> None:
    """Makes the processing of each new token raise for any sequence whose prompt holds `marker_token`."""
    processor = engine.output_processor
    original = processor._take_token

    def take_token(request, out, *args):
        if marker_token in out.seq.prompt_token_ids:
            raise RuntimeError("injected fault: secret internals")
        return original(request, out, *args)

    monkeypatch.setattr(processor, "_take_token", take_token)


def test_a_failing_request_ends_alone_offline(stories_path, monkeypatch):
    llm = LLM(stories_path, max_model_len=MAX_LEN)
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS[:4], params, use_tqdm=False)]
    bad = [1, 250, 40, 41]  # token 250 is the byte 0xF7: no ASCII prompt holds it
    assert all(250 not in o.prompt_token_ids for o in llm.generate(PROMPTS[:4], params, use_tqdm=False))
    _fail_on(llm.llm_engine, monkeypatch, 250)
    outs = llm.generate([*PROMPTS[:2], {"prompt_token_ids": bad}, *PROMPTS[2:4]], params, use_tqdm=False)
    assert outs[2].outputs[0].finish_reason == "error"
    assert [o.outputs[0].text for o in outs[:2] + outs[3:]] == expected
    assert llm.llm_engine.stats.num_kv_blocks_used == 0


def test_a_failing_forward_pass_fails_its_batch_only(stories_path, monkeypatch):
    llm = LLM(stories_path, max_model_len=MAX_LEN)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text
    original = engine.model_runner.execute
    calls = {"n": 0}

    def execute(out):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("injected: a bug in building this batch")
        return original(out)

    monkeypatch.setattr(engine.model_runner, "execute", execute)
    failed = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text == expected
    assert engine.stats.num_kv_blocks_used == 0


def test_a_failing_request_gets_a_500_and_others_carry_on(server, monkeypatch):
    _fail_on(server.engine.engine, monkeypatch, 250)
    result: dict[str, str] = {}

    def long_stream() -> None:
        with httpx.stream(
            "POST",
            server.url + "/v1/completions",
            timeout=60,
            json={"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True},
        ) as resp:
            text = ""
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
            result["text"] = text

    worker = threading.Thread(target=long_stream)
    worker.start()
    resp = post(server, {"prompt": [1, 250, 40], "max_tokens": 5})
    assert_openai_error(resp, 500)
    assert "secret" not in resp.text and "Traceback" not in resp.text
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        timeout=60,
        json={"prompt": [1, 250, 41], "max_tokens": 5, "stream": True},
    ) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data:")]
    assert '"server_error"' in lines[-2] and lines[-1] == "data: [DONE]" and "secret" not in "".join(lines)
    worker.join(timeout=60)
    monkeypatch.undo()
    expected = LLM(server.engine.engine.config.model, max_model_len=MAX_LEN).generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )
    assert result["text"] == expected[0].outputs[0].text
    assert_still_serves(server)


# ---- fairness and stalls -----------------------------------------------------------------------
def test_a_large_n_takes_turns_with_later_requests(stories_path):
    engine = LLMEngine(EngineConfig(model=stories_path, max_model_len=MAX_LEN, max_num_seqs=2))
    engine.add_request("wide", "Once upon a time", SamplingParams(n=6, max_tokens=20, ignore_eos=True))
    engine.add_request("small", "The cat", SamplingParams(max_tokens=4))
    engine.step()
    assert sorted(s.request_id for s in engine.scheduler.running) == ["small", "wide"]
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished[0] == "small"


def test_no_stall_from_huge_prompts_or_fan_out(server):
    """While one stream runs, a 10 MB prompt, a prompt too long for max_model_len by its characters, and
    an n=200000 request come in; the stream's largest gap between chunks stays under a second."""
    arrivals: list[float] = []

    def stream() -> None:
        with httpx.stream(
            "POST",
            server.url + "/v1/completions",
            timeout=120,
            json={"prompt": "Once", "max_tokens": MAX_LEN - 4, "temperature": 0, "ignore_eos": True, "stream": True},
        ) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())

    worker = threading.Thread(target=stream)
    worker.start()
    while not arrivals:
        time.sleep(0.005)
    statuses = [
        post(server, {"prompt": "word " * 2_000_000}).status_code,  # 10 MB
        post(server, {"prompt": "word " * 200_000}).status_code,  # 1 MB: too long by its length
        post(server, {"prompt": "Once", "n": 200000}).status_code,
        post(server, {"messages": [{"role": "user", "content": "w " * 500_000}]}, "/v1/chat/completions").status_code,
    ]
    worker.join(timeout=120)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    print(f"largest gap between chunks: {max(gaps) * 1e3:.0f} ms over {len(arrivals)} chunks")
    assert statuses == [413, 400, 400, 400]
    assert max(gaps) < 1.0


# ---- the OpenAI/vLLM fields that now work ------------------------------------------------------
def _tokens_join(choice: dict) -> str:
    return "".join(choice["logprobs"]["tokens"])


def test_completion_logprob_tokens_join_to_text(server):
    for fields in ({}, {"stop": [" the"]}, {"echo": True}):
        body = {"prompt": "Lily and Tom went to the park", "max_tokens": 30, "temperature": 0, "logprobs": 2, **fields}
        choice = post(server, body).json()["choices"][0]
        assert _tokens_join(choice) == choice["text"], fields
        lp = choice["logprobs"]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
        chunks = []
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = [c["choices"][0] for c in chunks]
        assert "".join(c["text"] for c in streamed) == choice["text"]
        assert [t for c in streamed for t in c["logprobs"]["tokens"]] == lp["tokens"]
        assert [o for c in streamed for o in c["logprobs"]["text_offset"]] == lp["text_offset"]
        assert [v for c in streamed for v in c["logprobs"]["token_logprobs"]] == pytest.approx(lp["token_logprobs"])
    assert " " in _tokens_join(choice) and any(t.startswith(" ") for t in choice["logprobs"]["tokens"])


def test_echo_with_logprobs_carries_prompt_logprobs(server, stories_path):
    prompt = "Lily and Tom went to the park"
    choice = post(server, {"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 1, "echo": True}).json()[
        "choices"
    ][0]
    assert choice["text"].startswith(prompt)
    lp = choice["logprobs"]
    ids = LLM(stories_path, max_model_len=MAX_LEN).get_tokenizer().encode(prompt)
    assert len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    logits = _hf_model(stories_path)(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = logits[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("graphs", [False, True])
def test_prompt_logprobs_equal_transformers_under_chunking_and_preemption(stories_path, graphs):
    """Eagerly, and through the CUDA-graph input path (prefill chunks' rows out of the prefill graphs)."""
    prompts = PROMPTS[2:4] + PROMPTS[:2]
    llm = LLM(
        stories_path, max_num_batched_tokens=16, num_gpu_blocks_override=6, max_num_seqs=4, enforce_eager=not graphs
    )
    runner = llm.llm_engine.model_runner
    if graphs and runner.graphs is None:
        runner.capture_cuda_graphs()  # off CUDA: the graphs' static, padded inputs, run eagerly
    params = SamplingParams(temperature=0, max_tokens=30, prompt_logprobs=3, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert not graphs or runner.graphs.prefill.num_replays > 0
    model = _hf_model(stories_path)
    for out in outs:
        ids = out.prompt_token_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for pos in range(1, len(ids)):
            entry = out.prompt_logprobs[pos]
            assert entry[ids[pos]].logprob == pytest.approx(logprobs[pos - 1, ids[pos]].item(), abs=1e-4)
            top = logprobs[pos - 1].topk(3)
            for token, value in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[token].logprob == pytest.approx(value, abs=1e-4)
        pieces = [out.prompt_logprobs[p][ids[p]].decoded_token for p in range(1, len(ids))]
        assert "".join(pieces) == llm.get_tokenizer().decode(ids, skip_special_tokens=True)


def test_prompt_logprobs_of_a_request_its_first_token_finishes(stories_path):
    """max_tokens=1 ends the sequence in its prefill step: its prompt logprobs are still recorded (an
    echo of the prompt with max_tokens=1 asks for exactly this)."""
    llm = LLM(stories_path, max_model_len=MAX_LEN)
    out = llm.generate("Lily and Tom", SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and all(out.prompt_logprobs[1:])


def test_logit_bias_and_allowed_token_ids(stories_path, server):
    llm = LLM(stories_path, max_model_len=MAX_LEN)
    plain = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    favourite = 300
    biased = llm.generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=6, logit_bias={favourite: 100.0}), use_tqdm=False
    )[0]
    assert biased.outputs[0].token_ids == [favourite] * 6 != plain.outputs[0].token_ids
    allowed = [300, 301, 302]
    for temperature in (0.0, 1.0):
        out = llm.generate(
            "Once upon a time",
            SamplingParams(temperature=temperature, max_tokens=10, seed=1, allowed_token_ids=allowed),
            use_tqdm=False,
        )[0]
        assert set(out.outputs[0].token_ids) <= set(allowed)
    resp = post(
        server, {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logit_bias": {str(favourite): 100}}
    ).json()
    assert resp["choices"][0]["text"] == biased.outputs[0].text
    resp = post(
        server,
        {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "allowed_token_ids": allowed, "logprobs": 0},
    ).json()
    assert resp["usage"]["completion_tokens"] == 6


def test_continuous_usage_stats(server):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 8 and all(c["usage"]["prompt_tokens"] for c in chunks)


def test_chat_logprob_tokens_and_bytes_join_to_content(qwen3_path):
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=qwen3_path, num_gpu_blocks_override=64)))
    with ServerThread(build_app(engine, ["qwen"])) as qwen:
        body = {
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 24,
            "temperature": 1.0,
            "seed": 5,
            "logprobs": True,
            "top_logprobs": 2,
            "ignore_eos": True,
        }
        choice = post(qwen, body, "/v1/chat/completions").json()["choices"][0]
        content = choice["logprobs"]["content"]
        assert "".join(e["token"] for e in content) == choice["message"]["content"]
        assert bytes(b for e in content for b in e["bytes"]).decode("utf-8") == choice["message"]["content"]
        with httpx.stream("POST", qwen.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = [
            e
            for c in chunks
            if c["choices"] and c["choices"][0]["logprobs"]
            for e in c["choices"][0]["logprobs"]["content"]
        ]
        assert [e["token"] for e in streamed] == [e["token"] for e in content]
        usage = {**body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        with httpx.stream("POST", qwen.url + "/v1/chat/completions", json=usage, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        counts = [c["usage"]["completion_tokens"] for c in chunks[body["n"] if "n" in body else 1 :]]
        assert counts == sorted(counts) and counts[-1] == 24
    engine.shutdown()


def test_vllm_metric_names(server):
    post(server, {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
    m = scrape(server.url)
    for name in (
        "iteration_tokens_total_count",
        "request_prompt_tokens_count",
        "request_generation_tokens_count",
        "request_queue_time_seconds_count",
        "request_prefill_time_seconds_count",
        "request_decode_time_seconds_count",
        "request_inference_time_seconds_count",
    ):
        assert m[f"mini_infer:{name}"] >= 1, name
    assert m["mini_infer:request_generation_tokens_sum"] >= 4
    assert m["mini_infer:iteration_tokens_total_sum"] >= 4


def test_streams_answer_with_an_error_event_and_done(server):
    """A bad value after streaming was asked for is still a plain 400 (the request is checked first)."""
    assert_openai_error(post(server, {"prompt": "Once", "stream": True, "top_k": 10**6}), 400, "top_k")


def test_serve_socket_sends_without_delay():
    """`mini-infer serve` sets TCP_NODELAY on its listening socket; accepted connections inherit it (Linux),
    so a response's body does not wait 40 ms for the client's delayed ACK of its headers."""
    from mini_infer.entrypoints.serve_cli import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
