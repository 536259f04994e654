"""`mini-infer serve` as a user starts it: a subprocess on 127.0.0.1, port 0, with --api-key."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served(stories_path):
    cmd = [
        sys.executable,
        "-m",
        "mini_infer.cli",
        "serve",
        "--model",
        stories_path,
        "--port",
        "0",
        "--api-key",
        "sekret",
        "--served-model-name",
        "tiny-stories",
        "--num-gpu-blocks-override",
        "256",
        "--log-level",
        "info",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if match and not url:
                url.append(match.group(1))
            if "Application startup complete" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert found.wait(120), "server did not start:\n" + "".join(lines)
        yield url[0], lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_logs_address_model_and_kv_pool(served):
    url, lines = served
    log = "".join(lines)
    assert url.startswith("http://127.0.0.1:")
    assert "stories260K" in log and "tiny-stories" in log
    assert re.search(r"KV pool 256 blocks x 16 = 4096 tokens", log), log
    assert "API key required" in log


def test_serve_enforces_api_key(served):
    url, _ = served
    assert httpx.get(url + "/health").status_code == 200
    resp = httpx.get(url + "/v1/models")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny-stories"]
    resp = client.completions.create(model="tiny-stories", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert resp.choices[0].text.startswith(", there was")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="stories", prompt="x", max_tokens=2)


def test_serve_refuses_a_busy_port(served, stories_path):
    port = served[0].rsplit(":", 1)[1]
    start = time.monotonic()
    cmd = [sys.executable, "-m", "mini_infer.cli", "serve", "--model", stories_path, "--port", port]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert proc.returncode != 0
    assert "in use" in (proc.stdout + proc.stderr).lower()
    assert time.monotonic() - start < 60
