"""`mini-infer disagg-proxy` end to end: a prefill server (kv_producer) and a decode server (kv_consumer)
sharing a SharedStorageConnector directory, the proxy in front, driven by the official `openai` client.
The answers must equal one offline engine's, and the decode server's /metrics must show the prompts'
KV loaded, not computed."""

from __future__ import annotations

import httpx
import openai
import pytest
from test_server import ServerThread, scrape

from mini_infer import LLM, EngineConfig, LLMEngine, SamplingParams
from mini_infer.async_engine import AsyncLLMEngine
from mini_infer.entrypoints.disagg_proxy import build_proxy_app, prefill_request
from mini_infer.entrypoints.openai.api_server import build_app

PROMPT = "Once upon a time there was a little robot who wanted to see the sea. " * 3
MESSAGES = [{"role": "user", "content": "Tell me a long story about a robot who wanted to see the sea. " * 2}]


@pytest.fixture(scope="module")
def servers(qwen3_path, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("kv"))
    started = []
    urls = {}
    for role in ("kv_producer", "kv_consumer"):
        transfer = {
            "kv_connector": "SharedStorageConnector",
            "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": directory},
        }
        engine = AsyncLLMEngine(
            LLMEngine(EngineConfig(model=qwen3_path, num_gpu_blocks_override=128, kv_transfer_config=transfer))
        )
        server = ServerThread(build_app(engine, ["qwen"])).__enter__()
        started.append((server, engine))
        urls[role] = server.url
    proxy = ServerThread(build_proxy_app(urls["kv_producer"], urls["kv_consumer"])).__enter__()
    yield proxy.url, urls["kv_producer"], urls["kv_consumer"]
    proxy.__exit__(None, None, None)
    for server, engine in started:
        server.__exit__(None, None, None)
        engine.shutdown()


@pytest.fixture(scope="module")
def offline(qwen3_path):
    return LLM(qwen3_path, num_gpu_blocks_override=128)


def test_prefill_request_asks_for_one_token():
    body = {
        "model": "m",
        "prompt": "p",
        "max_tokens": 50,
        "stream": True,
        "stream_options": {},
        "n": 2,
        "min_tokens": 4,
    }
    assert prefill_request(body) == {"model": "m", "prompt": "p", "max_tokens": 1}
    assert prefill_request({"messages": [], "max_completion_tokens": 9}) == {"messages": [], "max_tokens": 1}


def test_proxy_completions_and_chat_equal_one_engine(servers, offline):
    proxy, prefill, decode = servers
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert httpx.get(proxy + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == ["qwen"]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    expected = offline.generate(PROMPT, greedy, use_tqdm=False)[0]

    resp = client.completions.create(model="qwen", prompt=PROMPT, max_tokens=16, temperature=0)
    assert resp.choices[0].text == expected.outputs[0].text and resp.usage.completion_tokens == 16
    loaded = scrape(decode)["mini_infer:kv_transfer_loaded_tokens_total"]
    num_prompt = len(expected.prompt_token_ids)
    assert loaded == (num_prompt - 1) // 16 * 16 > 0  # every full block before the last token
    assert scrape(prefill)["mini_infer:kv_transfer_saved_tokens_total"] == num_prompt // 16 * 16

    chunks = list(client.completions.create(model="qwen", prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
    # the second time the decode server has the prompt in its own prefix cache: nothing more is loaded
    assert scrape(decode)["mini_infer:kv_transfer_loaded_tokens_total"] == loaded

    chat_expected = offline.chat(MESSAGES, greedy, use_tqdm=False)[0]
    stream = client.chat.completions.create(
        model="qwen", messages=MESSAGES, max_completion_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_expected.outputs[0].text
    chat_loaded = (len(chat_expected.prompt_token_ids) - 1) // 16 * 16
    assert scrape(decode)["mini_infer:kv_transfer_loaded_tokens_total"] == loaded + chat_loaded


def test_proxy_passes_errors_through(servers):
    proxy, _, _ = servers
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="qwen", prompt="hi", max_tokens=4, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi", max_tokens=4)
    assert httpx.post(proxy + "/v1/completions", content=b"{oops").status_code == 400
    broken = ServerThread(build_proxy_app("http://127.0.0.1:9", "http://127.0.0.1:9")).__enter__()
    try:
        response = httpx.post(broken.url + "/v1/completions", json={"prompt": "hi"})
        assert response.status_code == 502 and "prefill server is unreachable" in response.json()["error"]["message"]
        assert httpx.get(broken.url + "/health").status_code == 503
    finally:
        broken.__exit__(None, None, None)
