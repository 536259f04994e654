"""How long do other users' streams stall while hostile requests come in? (CPU, stories260K, loopback)

One greedy stream of 400 tokens runs; meanwhile a 10 MB prompt, a 1 MB prompt, a request with
n=200000 and a 4-token request are sent one after another. Prints the stream's largest gap between
chunks, each hostile request's status and seconds, and the small request's latency.

    PYTHONPATH=. python benchmarks/server_stall.py --model ../shared/models/stories260K
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import httpx
import uvicorn

from mini_infer import EngineConfig, LLMEngine
from mini_infer.async_engine import AsyncLLMEngine
from mini_infer.entrypoints.openai.api_server import build_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--stream-tokens", type=int, default=400)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()

    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=args.model, num_gpu_blocks_override=2048)))
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as `mini-infer serve` does
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(engine, ["m"]), log_level="error", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)

    arrivals: list[float] = []

    def stream() -> None:
        body = {
            "prompt": "Once",
            "max_tokens": args.stream_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())

    worker = threading.Thread(target=stream)
    worker.start()
    while len(arrivals) < 3:
        time.sleep(0.005)
    hostile = {
        "prompt_10MB": {"prompt": "word " * 2_000_000, "max_tokens": 4},
        "prompt_1MB": {"prompt": "word " * 200_000, "max_tokens": 4},
        "n_200000": {"prompt": "Once", "n": 200_000, "max_tokens": 4},
        "small_4_tokens": {"prompt": "The cat", "max_tokens": 4, "temperature": 0},
    }
    results = {}
    for name, body in hostile.items():
        start = time.monotonic()
        try:
            status = httpx.post(url + "/v1/completions", json=body, timeout=args.request_timeout).status_code
        except httpx.TimeoutException:
            status = f"no answer in {args.request_timeout} s"
        results[name] = {"status": status, "seconds": round(time.monotonic() - start, 3)}
        print(name, results[name], flush=True)
    worker.join()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    results["stream"] = {"chunks": len(arrivals), "largest_gap_s": round(max(gaps), 3)}
    print(json.dumps(results, indent=1))
    server.should_exit = True
    engine.shutdown()
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {
                    "command": "python benchmarks/server_stall.py "
                    + " ".join(
                        f"--{k.replace('_', '-')} {v}"
                        for k, v in vars(args).items()
                        if v is not None and k != "output_json"
                    ),
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
