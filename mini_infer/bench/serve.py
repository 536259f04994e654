"""`mini-infer bench serve`: load-test any OpenAI-compatible endpoint, the way vLLM's serving benchmark does.

Sends N streaming requests (random prompts of given lengths, or a JSONL of prompts) all at once or
at a Poisson request rate, times each token as it arrives, and reports request and token throughput,
TTFT / TPOT / ITL / end-to-end latency percentiles and goodput under SLOs. `--sweep` runs several
rates in a row and plots them. Only the client side lives here: it needs httpx (and matplotlib to plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Words for random text prompts when no tokenizer is given: the server's usage counts the real tokens.
_WORDS = (
    "the cat dog sun moon tree house little big happy sad girl boy ran jumped played saw went "
    "found friend mom dad ball park day night water bird fish red blue green small tall funny "
    "one two three time story because then when they she he it was had said and but so very"
).split()


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int | None  # known in tokens for token-id prompts; otherwise taken from usage
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0


# ---- prompts --------------------------------------------------------------------------------
def random_requests(args: argparse.Namespace, rng: random.Random) -> list[BenchRequest]:
    """Prompts of about --random-input-len tokens, each asking for about --random-output-len."""
    tokenizer = None
    if args.tokenizer and args.random_prompt_format == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    lo_tok, hi_tok = args.random_token_range
    requests = []
    for _ in range(args.num_prompts):
        input_len = _jitter(args.random_input_len, args.random_range_ratio, rng)
        output_len = _jitter(args.random_output_len, args.random_range_ratio, rng)
        if args.random_prompt_format == "token-ids":
            ids = [rng.randrange(lo_tok, hi_tok) for _ in range(input_len)]
            requests.append(BenchRequest(ids, input_len, output_len))
        elif tokenizer is not None:
            ids = [rng.randrange(lo_tok, min(hi_tok, len(tokenizer))) for _ in range(input_len)]
            requests.append(BenchRequest(tokenizer.decode(ids), None, output_len))
        else:
            requests.append(BenchRequest(" ".join(rng.choice(_WORDS) for _ in range(input_len)), None, output_len))
    return requests


def _jitter(mean: int, ratio: float, rng: random.Random) -> int:
    return max(1, rng.randint(int(mean * (1 - ratio)), int(mean * (1 + ratio))) if ratio else mean)


def jsonl_requests(path: str, num: int, default_output_len: int) -> list[BenchRequest]:
    """Lines of `{"prompt": "..." | [ids], "max_tokens": N}` or bare JSON strings; cycled up to `num`."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        row = {"prompt": row} if isinstance(row, str) else row
        prompt = row["prompt"]
        output_len = int(row.get("max_tokens") or row.get("output_len") or default_output_len)
        rows.append(BenchRequest(prompt, len(prompt) if isinstance(prompt, list) else None, output_len))
    if not rows:
        raise SystemExit(f"bench serve: {path} holds no prompts")
    return [rows[i % len(rows)] for i in range(num)]


# ---- one request ----------------------------------------------------------------------------
def build_payload(args: argparse.Namespace, model: str, req: BenchRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        payload["ignore_eos"] = True
    if args.endpoint.rstrip("/").endswith("chat/completions"):
        if not isinstance(req.prompt, str):
            raise SystemExit("bench serve: the chat endpoint needs text prompts")
        payload["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        payload["prompt"] = req.prompt
    return payload


async def send_request(
    client: Any, url: str, headers: dict[str, str], payload: dict[str, Any], req: BenchRequest
) -> RequestResult:
    """Streams one request; every chunk that carries a choice counts as a token arrival."""
    result = RequestResult(prompt_len=req.prompt_len or 0)
    start = time.perf_counter()
    result.start_time = start
    last = start
    token_events = 0
    usage = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.success = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))[:300]
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta")
                    if delta is not None and "role" in delta and not delta.get("content"):
                        continue  # chat's opening role chunk carries no token
                    now = time.perf_counter()
                    if token_events == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    token_events += 1
    except Exception as exc:  # noqa: BLE001 - one failed request is a data point, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.latency = time.perf_counter() - start
    if usage:
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)
    else:
        result.output_tokens = token_events
    if result.success and token_events == 0:
        result.success, result.error = False, "the stream carried no tokens"
    return result


# ---- one run at one rate --------------------------------------------------------------------
async def run_at_rate(
    args: argparse.Namespace, requests: list[BenchRequest], model: str, rate: float, seed: int
) -> dict[str, Any]:
    import httpx

    url = args.base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(seed)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=args.max_concurrency or None)
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 30.0))
    bar = _progress(len(requests), disable=args.disable_tqdm, desc=f"rate {rate:g}")
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(req: BenchRequest) -> RequestResult:
            payload = build_payload(args, model, req)
            if limit is None:
                result = await send_request(client, url, headers, payload, req)
            else:
                async with limit:
                    result = await send_request(client, url, headers, payload, req)
            if bar is not None:
                bar.update(1)
            return result

        start = time.perf_counter()
        deadline = start + args.max_duration if args.max_duration else math.inf
        tasks = []
        for req in requests:
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.ensure_future(one(req)))
            if math.isfinite(rate) and rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        pending: set = set()
        if tasks:
            left = deadline - time.perf_counter()
            _, pending = await asyncio.wait(tasks, timeout=None if math.isinf(left) else max(left, 0.0))
        for task in pending:
            task.cancel()
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    results = [t.result() for t in tasks if t not in pending]
    cut_off = len(pending) + len(requests) - len(tasks)
    results += [RequestResult(error="cut off by --max-duration") for _ in range(cut_off)]
    return summarize(results, duration, rate, args)


def _progress(total: int, disable: bool, desc: str) -> Any:
    if disable:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr)


# ---- numbers ---------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _describe(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    """Mean / median / std / pXX of one latency, in milliseconds (vLLM's key names)."""
    ms = [v * 1000 for v in values_s]
    mean = sum(ms) / len(ms) if ms else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms)) if ms else 0.0
    out = {f"mean_{name}_ms": mean, f"median_{name}_ms": _percentile(ms, 50), f"std_{name}_ms": std}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = _percentile(ms, p)
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50 e2el:10000` (milliseconds) -> SLOs a request must all meet to count."""
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"bench serve: --goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slos[key] = float(value)
    return slos


def summarize(results: list[RequestResult], duration: float, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    percentiles = [float(p) for p in str(args.percentiles).split(",")]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    slos = parse_goodput(args.goodput)
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        measured = {"ttft": r.ttft * 1000, "tpot": tpot * 1000, "e2el": r.latency * 1000}
        good += all(measured[k] <= v for k, v in slos.items())
    duration = max(duration, 1e-9)
    summary: dict[str, Any] = {
        "request_rate": "inf" if not math.isfinite(rate) else rate,
        "max_concurrency": args.max_concurrency,
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "request_goodput": good / duration if slos else None,
        "goodput_slos_ms": slos or None,
        **_describe("ttft", [r.ttft for r in ok], percentiles),
        **_describe("tpot", tpots, percentiles),
        **_describe("itl", [x for r in ok for x in r.itl], percentiles),
        **_describe("e2el", [r.latency for r in ok], percentiles),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    return summary


def format_summary(s: dict[str, Any], percentiles: list[float]) -> str:
    lines = [f"{' Serving Benchmark Result ':=^60}"]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<42}{value:>18{fmt}}" if value is not None else f"{label:<42}{'-':>18}")

    row("Request rate (req/s):", str(s["request_rate"]))
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration"], ".2f")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"], ".2f")
    if s["request_goodput"] is not None:
        row("Request goodput (req/s):", s["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", s["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", s["total_token_throughput"], ".2f")
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        lines.append(f"{' ' + title + ' ':-^60}")
        row(f"Mean {name.upper()} (ms):", s[f"mean_{name}_ms"], ".2f")
        row(f"Median {name.upper()} (ms):", s[f"median_{name}_ms"], ".2f")
        for p in percentiles:
            row(f"P{p:g} {name.upper()} (ms):", s[f"p{p:g}_{name}_ms"], ".2f")
    if s["errors"]:
        lines.append("errors: " + " | ".join(s["errors"]))
    lines.append("=" * 60)
    return "\n".join(lines)


def format_sweep_table(runs: list[dict[str, Any]]) -> str:
    header = (
        f"{'rate':>6} {'done':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p50':>9} {'TPOT p99':>9} {'E2E p50':>9}"
    )
    lines = [header, "-" * len(header)]
    for s in runs:
        lines.append(
            f"{str(s['request_rate']):>6} {s['completed']:>6} {s['request_throughput']:>7.2f} "
            f"{s['output_throughput']:>10.1f} {s['median_ttft_ms']:>9.1f} {s.get('p99_ttft_ms', 0):>9.1f} "
            f"{s['median_tpot_ms']:>9.2f} {s.get('p99_tpot_ms', 0):>9.2f} {s['median_e2el_ms']:>9.1f}"
        )
    return "\n".join(lines) + "\n(latencies in ms)"


def plot_sweep(runs: list[dict[str, Any]], path: str, title: str) -> bool:
    """Throughput and latency against the offered rate; 'inf' is drawn right of the largest rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench serve: matplotlib is not installed, so no plot was drawn", file=sys.stderr)
        return False
    finite = [float(r["request_rate"]) for r in runs if r["request_rate"] != "inf"]
    inf_x = (max(finite) * 2) if finite else 1.0
    xs = [inf_x if r["request_rate"] == "inf" else float(r["request_rate"]) for r in runs]
    order = sorted(range(len(runs)), key=lambda i: xs[i])
    xs = [xs[i] for i in order]
    runs = [runs[i] for i in order]
    labels = ["inf" if r["request_rate"] == "inf" else f"{float(r['request_rate']):g}" for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(xs, [r["request_throughput"] for r in runs], "o-", label="achieved req/s")
    axes[0].plot(
        xs, [x if lab != "inf" else float("nan") for x, lab in zip(xs, labels)], "k--", lw=0.8, label="offered req/s"
    )
    axes[0].set_ylabel("requests / s")
    ax_tok = axes[0].twinx()
    ax_tok.plot(xs, [r["output_throughput"] for r in runs], "s-", color="tab:orange", label="output tok/s")
    ax_tok.set_ylabel("output tokens / s")
    axes[0].legend(loc="upper left", fontsize=8)
    ax_tok.legend(loc="lower right", fontsize=8)
    for ax, name, unit in ((axes[1], "ttft", "TTFT (ms, log scale)"), (axes[2], "tpot", "TPOT (ms)")):
        ax.plot(xs, [r[f"median_{name}_ms"] for r in runs], "o-", label="p50")
        if f"p99_{name}_ms" in runs[0]:
            ax.plot(xs, [r[f"p99_{name}_ms"] for r in runs], "s--", label="p99")
        ax.set_ylabel(unit)
        if name == "ttft":
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("offered request rate (req/s)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- command ---------------------------------------------------------------------------------
def _rate(value: str) -> float:
    return math.inf if value.strip().lower() in ("inf", "infinity") else float(value)


def _get_default_model(args: argparse.Namespace) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    response = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def run_bench_serve(args: argparse.Namespace) -> int:
    rates = [_rate(r) for r in args.sweep.split(",")] if args.sweep else [args.request_rate]
    if args.dataset == "jsonl" and not args.dataset_path:
        raise ValueError("--dataset jsonl needs --dataset-path FILE")

    def make_requests(seed: int) -> list[BenchRequest]:
        """Random prompts are new for each run, so no run is sped up by an earlier one's prefix cache."""
        if args.dataset == "jsonl":
            return jsonl_requests(args.dataset_path, args.num_prompts, args.random_output_len)
        return random_requests(args, random.Random(seed))

    model = args.model or _get_default_model(args)
    if not args.result_file:
        from mini_infer.bench.common import default_result_path

        args.result_file = default_result_path("serve", model, args.result_dir)
    percentiles = [float(p) for p in str(args.percentiles).split(",")]
    runs: list[dict[str, Any]] = []
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": model,
        "dataset": args.dataset,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "label": args.label,
    }
    if args.warmup:
        warmup = make_requests(args.seed + 10_000)[: args.warmup]
        asyncio.run(run_at_rate(_quiet(args), warmup, model, math.inf, args.seed))
    for i, rate in enumerate(rates):
        summary = asyncio.run(run_at_rate(args, make_requests(args.seed + i), model, rate, args.seed + i))
        runs.append(summary)
        print(format_summary(summary, percentiles), flush=True)
        if args.result_file:
            _write_json(
                args.result_file, {**meta, **summary} if len(rates) == 1 and not args.sweep else {**meta, "runs": runs}
            )
    if len(runs) > 1 or args.sweep:
        print(format_sweep_table(runs), flush=True)
        if args.plot:
            plot_sweep(runs, args.plot, args.label or f"{model}: {args.endpoint}")
    print(f"results written to {args.result_file}")
    return 0 if all(r["completed"] for r in runs) else 1


def _quiet(args: argparse.Namespace) -> argparse.Namespace:
    quiet = argparse.Namespace(**vars(args))
    quiet.disable_tqdm = True
    return quiet


def _write_json(path: str, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's address")
    parser.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key, if needed")
    parser.add_argument("--dataset", choices=["random", "jsonl"], default="random")
    parser.add_argument("--dataset-path", default=None, help='JSONL of {"prompt": ..., "max_tokens": N}')
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--random-input-len", type=int, default=200)
    parser.add_argument("--random-output-len", type=int, default=180)
    parser.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths drawn uniformly from len*(1-r)..len*(1+r)"
    )
    parser.add_argument(
        "--random-prompt-format",
        choices=["text", "token-ids"],
        default="text",
        help="token-ids sends prompts as lists of ints (for servers without a tokenizer)",
    )
    parser.add_argument(
        "--random-token-range",
        type=int,
        nargs=2,
        default=[3, 500],
        metavar=("LO", "HI"),
        help="random token ids are drawn from [LO, HI)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="make text prompts of exact token lengths with this tokenizer"
    )
    parser.add_argument(
        "--request-rate", type=_rate, default=math.inf, help="Poisson arrival rate in req/s; inf sends all at once"
    )
    parser.add_argument("--sweep", default=None, help="comma-separated rates run in turn, e.g. 2,4,8,inf")
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most this many in flight")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    parser.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:20000",
    )
    parser.add_argument("--percentiles", default="50,90,99")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for one request")
    parser.add_argument(
        "--max-duration",
        type=float,
        default=None,
        help="seconds allowed for one rate's run; unfinished requests count as failed",
    )
    parser.add_argument("--warmup", type=int, default=1, help="requests sent (and dropped) before timing")
    parser.add_argument(
        "--result-file", default=None, help="write the results as JSON here (default: RESULT_DIR/serve-MODEL-TIME.json)"
    )
    parser.add_argument("--result-dir", default="bench-results", help="folder for results written by default")
    parser.add_argument("--plot", default=None, help="with --sweep: write a PNG plot here")
    parser.add_argument("--label", default=None, help="a title for the results and the plot")
    parser.add_argument("--disable-tqdm", action="store_true")
    return parser


def add_bench_serve_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser(
        "serve", help="load-test an OpenAI-compatible server", description=__doc__.splitlines()[0]
    )
    add_bench_serve_arguments(parser)
    parser.set_defaults(func=run_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_bench_serve_arguments(argparse.ArgumentParser(prog="mini-infer bench serve", description=__doc__))
    return run_bench_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
