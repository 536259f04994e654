"""Disaggregated prefill/decode vs one engine with chunked prefill, on a mixed long-prompt workload.

Two setups on the same device, one after the other, each served over HTTP and loaded by the same
streaming client (`mini-infer bench serve`'s):

- single: one `mini-infer serve` with chunked prefill (--max-num-batched-tokens), all of the memory;
- disagg: a prefill server (kv_producer) and a decode server (kv_consumer) sharing KV through a
  SharedMemoryConnector segment, behind `mini-infer disagg-proxy`. On one GPU the two engines split its
  memory: the prefill server starts first with --prefill-gpu-memory-utilization, then the decode server
  with --decode-gpu-memory-utilization (cumulative: each engine's budget is that fraction of the GPU less
  what is in use when it starts).

The workload: --num-prompts random token-id prompts (none shares a prefix), --long-fraction of them
--long-len tokens and the rest --short-len, each generating --output-len tokens (ignore_eos), arriving
at --request-rate per second (Poisson). Reported per setup: TTFT, ITL and end-to-end percentiles,
throughput, and the decode server's loaded prompt tokens. What to expect (vLLM's docs say so too):
disaggregation does not raise throughput; it keeps long prefills from stalling other requests' decodes,
so ITL's tail drops, while TTFT pays for the extra hop and the KV copy.

    # CPU smoke run (what tests/test_benchmark_scripts.py runs)
    python benchmarks/disagg.py --smoke --output-json /tmp/disagg.json
    # H200
    python benchmarks/disagg.py --model llama-3-8b --num-prompts 200 --request-rate 4 \\
        --output-json benchmarks/results/h200/disagg_llama-3-8b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from mini_infer.bench.serve import BenchRequest, run_at_rate

SMOKE = dict(
    model="tiny-llama",
    device="cpu",
    num_prompts=6,
    long_len=96,
    short_len=24,
    output_len=8,
    request_rate=float("inf"),
    max_model_len=256,
    max_num_batched_tokens=64,
    shared_memory_gib=0.05,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `mini-infer` command in a subprocess, its output in a log file, up once /health answers."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "mini_infer.cli", *args, "--port", str(self.port), "--log-level", "warning"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} did not come up in {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def workload(args: argparse.Namespace, vocab: int) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    n_long = round(args.long_fraction * args.num_prompts)
    lens = [args.long_len] * n_long + [args.short_len] * (args.num_prompts - n_long)
    rng.shuffle(lens)
    return [BenchRequest([rng.randrange(3, vocab) for _ in range(n)], n, args.output_len) for n in lens]


def serve_args(args: argparse.Namespace, memory: float, *extra: str) -> list[str]:
    common = ["serve", "--model", args.model, "--load-format", args.load_format, "--device", args.device]
    common += ["--max-model-len", str(args.max_model_len), "--disable-access-log", "--enable-prefix-caching"]
    if args.device != "cpu":
        common += ["--gpu-memory-utilization", str(memory)]
    return common + list(extra)


def client_args(args: argparse.Namespace, url: str) -> argparse.Namespace:
    return argparse.Namespace(
        base_url=url,
        endpoint="/v1/completions",
        api_key=None,
        max_concurrency=None,
        timeout=args.timeout,
        disable_tqdm=True,
        max_duration=None,
        percentiles="50,90,99",
        goodput=None,
        temperature=0.0,
        ignore_eos=True,
    )


def measure(args: argparse.Namespace, url: str, requests: list[BenchRequest]) -> dict:
    """Two short warm-up requests of their own (compiles, first graphs), then the workload."""
    rng = random.Random(args.seed + 1)
    vocab = max(max(r.prompt) for r in requests) + 1
    warmup = [BenchRequest([rng.randrange(3, vocab) for _ in range(args.short_len)], args.short_len, 4)] * 2
    asyncio.run(run_at_rate(client_args(args, url), warmup, args.model, float("inf"), 0))
    return asyncio.run(run_at_rate(client_args(args, url), requests, args.model, args.request_rate, args.seed))


def run_single(args: argparse.Namespace, requests: list[BenchRequest], log_dir: Path) -> dict:
    server = Server(
        "single",
        serve_args(
            args, args.single_gpu_memory_utilization, "--max-num-batched-tokens", str(args.max_num_batched_tokens)
        ),
        log_dir,
    )
    try:
        server.wait(args.startup_timeout)
        return {"mode": "single", **measure(args, server.url, requests)}
    finally:
        server.stop()


def run_disagg(args: argparse.Namespace, requests: list[BenchRequest], log_dir: Path) -> dict:
    extra = {
        "shared_memory_gib": args.shared_memory_gib,
        "shared_memory_name": f"mini-infer-bench-{free_port()}",
        "shared_memory_dir": str(log_dir) if args.smoke else args.shared_memory_dir,
    }

    def transfer(role: str) -> str:
        return json.dumps(
            {"kv_connector": "SharedMemoryConnector", "kv_role": role, "kv_connector_extra_config": extra}
        )

    servers = []
    try:
        prefill = Server(
            "prefill",
            serve_args(
                args,
                args.prefill_gpu_memory_utilization,
                "--kv-transfer-config",
                transfer("kv_producer"),
                "--max-num-batched-tokens",
                str(max(args.max_num_batched_tokens, args.long_len)),
            ),
            log_dir,
        )
        servers.append(prefill)
        prefill.wait(args.startup_timeout)  # its memory is in use before the decode engine sizes its pool
        decode = Server(
            "decode",
            serve_args(
                args,
                args.decode_gpu_memory_utilization,
                "--kv-transfer-config",
                transfer("kv_consumer"),
                "--max-num-batched-tokens",
                str(args.max_num_batched_tokens),
            ),
            log_dir,
        )
        servers.append(decode)
        decode.wait(args.startup_timeout)
        proxy = Server("proxy", ["disagg-proxy", "--prefill", prefill.url, "--decode", decode.url], log_dir)
        servers.append(proxy)
        proxy.wait(args.startup_timeout)
        summary = measure(args, proxy.url, requests)
        summary["kv_transfer_loaded_tokens"] = metric(decode.url, "mini_infer:kv_transfer_loaded_tokens_total")
        summary["kv_transfer_saved_tokens"] = metric(prefill.url, "mini_infer:kv_transfer_saved_tokens_total")
        summary["decode_prompt_tokens"] = metric(decode.url, "mini_infer:prompt_tokens_total")
        return {"mode": "disagg", **summary}
    finally:
        for server in reversed(servers):
            server.stop()
        shm = Path(extra["shared_memory_dir"])
        for segment in shm.glob(extra["shared_memory_name"] + "-*"):
            segment.unlink()


COLUMNS = [
    ("ttft p50", "p50_ttft_ms"),
    ("ttft p90", "p90_ttft_ms"),
    ("ttft p99", "p99_ttft_ms"),
    ("itl p50", "p50_itl_ms"),
    ("itl p90", "p90_itl_ms"),
    ("itl p99", "p99_itl_ms"),
    ("e2e p50", "p50_e2el_ms"),
    ("e2e p99", "p99_e2el_ms"),
    ("out tok/s", "output_throughput"),
]


def table(rows: list[dict]) -> str:
    lines = ["| mode | " + " | ".join(c for c, _ in COLUMNS) + " | completed |", "|---" * (len(COLUMNS) + 2) + "|"]
    for r in rows:
        cells = " | ".join(f"{r[k]:.1f}" for _, k in COLUMNS)
        lines.append(f"| {r['mode']} | {cells} | {r['completed']}/{r['num_prompts']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings (tiny-llama, a few short requests)")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--device", default="cuda")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--long-fraction", type=float, default=0.2, help="share of the prompts that are long")
    # defaults: long prompts + --output-len within llama-3-8b's 8192 positions
    p.add_argument("--long-len", type=int, default=7680)
    p.add_argument("--short-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=4.0, help="requests per second (inf: all at once)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the chunked-prefill budget")
    p.add_argument("--single-gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--prefill-gpu-memory-utilization", type=float, default=0.4)
    p.add_argument("--decode-gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--shared-memory-gib", type=float, default=32.0, help="the KV segment between the engines")
    p.add_argument(
        "--shared-memory-dir", default="/dev/shm", help="where the segment lives (check that it has the room: df)"
    )
    p.add_argument("--modes", default="single,disagg")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    from mini_infer.bench.common import load_model_config

    vocab = load_model_config(args.model, args.load_format).vocab_size
    requests = workload(args, vocab)
    rows = []
    with tempfile.TemporaryDirectory(prefix="disagg-bench-") as tmp:
        for mode in args.modes.split(","):
            run = {"single": run_single, "disagg": run_disagg}[mode]
            rows.append(run(args, requests, Path(tmp)))
            print(f"{mode}: done", file=sys.stderr, flush=True)
    print(table(rows))
    record = {"settings": {k: v for k, v in vars(args).items()}, "runs": rows}
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["completed"] == r["num_prompts"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
