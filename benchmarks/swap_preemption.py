"""Swap vs recompute preemption on a workload that overflows the KV pool, for short and long sequences.

Every request arrives at once (prompt of --prompt-lens tokens, --max-tokens generated, ignore_eos) and the
KV pool is forced (num_gpu_blocks_override) to hold the prompts of --pool-fraction of them: as the admitted
ones generate they overflow it, and requests are preempted over and over. For each prompt length and
preemption mode: wall time, output tokens/s, the recomputed tokens (scheduled minus prompt minus
generated), preemptions and swaps, end-to-end latency percentiles of all requests and of those that were
preempted (of the fastest of --repeats runs). Dummy weights: the timing does not depend on them.

    # CPU (the numbers in docs/preemption.md)
    python benchmarks/swap_preemption.py --model tiny-llama --device cpu --swap-space 0.5 \\
        --output-json benchmarks/results/cpu/swap_preemption.json
    # H200
    python benchmarks/swap_preemption.py --model llama-3-8b --prompt-lens 128,2048 --num-requests 64 \\
        --max-tokens 128 --swap-space 24 --output-json benchmarks/results/h200/swap_preemption_llama-3-8b.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from mini_infer import LLMEngine, SamplingParams
from mini_infer.bench.common import free_device_memory
from mini_infer.config import EngineConfig


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run(args: argparse.Namespace, prompt_len: int, mode: str) -> dict:
    free_device_memory()
    need = -(-(prompt_len + args.max_tokens) // args.block_size)  # blocks of one request at its end
    # room for the prompts (and first tokens) of pool_fraction of the requests: their growth overflows it
    admitted = max(1, int(args.pool_fraction * args.num_requests))
    pool = max(need + 1, admitted * -(-(prompt_len + 1) // args.block_size) + 1)
    config = EngineConfig(
        model=args.model,
        load_format=args.load_format,
        device=args.device,
        dtype=args.dtype,
        max_model_len=prompt_len + args.max_tokens + args.block_size,
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks_override=pool,
        block_size=args.block_size,
        enable_prefix_caching=False,  # random prompts share nothing; recompute would gain nothing from it
        preemption_mode=mode,
        swap_space=args.swap_space,
    )
    engine = LLMEngine(config)
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    preempted: set[str] = set()
    preempt = engine.scheduler._preempt

    def watched(seq) -> None:
        preempted.add(seq.request_id)
        preempt(seq)

    engine.scheduler._preempt = watched
    # warm-up: one short request, outside the timing
    engine.add_request("warmup", {"prompt_token_ids": [1] * 8}, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    preempted.clear()
    before = engine.stats
    if torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.num_requests):
        engine.add_request(str(i), {"prompt_token_ids": [rng.randrange(vocab) for _ in range(prompt_len)]}, params)
    latency: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                latency[out.request_id] = time.perf_counter() - start
    wall = time.perf_counter() - start
    stats = engine.stats
    prompt = stats.prompt_tokens - before.prompt_tokens
    generated = stats.generation_tokens - before.generation_tokens
    e2e = list(latency.values())
    hit = [latency[r] for r in preempted]
    row = {
        "prompt_len": prompt_len,
        "mode": mode,
        "num_requests": args.num_requests,
        "max_tokens": args.max_tokens,
        "kv_blocks": pool,
        "kv_blocks_needed": args.num_requests * need,
        "host_blocks": stats.num_host_blocks_total,
        "wall_s": wall,
        "output_tok_s": generated / wall,
        # a request's last token is sampled, never fed back: the rest is what preemption made run again
        "recomputed_tokens": stats.num_scheduled_tokens
        - before.num_scheduled_tokens
        - prompt
        - generated
        + args.num_requests,
        "num_preemptions": stats.num_preemptions - before.num_preemptions,
        "num_swap_outs": stats.num_swap_outs - before.num_swap_outs,
        "num_preempted_requests": len(preempted),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
        "preempted_e2e_p50_s": percentile(hit, 50),
        "preempted_e2e_p99_s": percentile(hit, 99),
    }
    del engine
    return row


def markdown(rows: list[dict], command: str, device: str) -> str:
    lines = [
        f"# Swap vs recompute preemption ({device})",
        "",
        f"`{command}`",
        "",
        "| prompt | mode | KV blocks / needed | wall s | out tok/s | recomputed tok | preemptions | swaps | "
        "p50 / p99 e2e s | preempted p50 / p99 s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        lines.append(
            f"| {r['prompt_len']} | {r['mode']} | {r['kv_blocks']} / {r['kv_blocks_needed']} | {r['wall_s']:.2f} | "
            f"{r['output_tok_s']:.1f} | {r['recomputed_tokens']} | {r['num_preemptions']} | {r['num_swap_outs']} | "
            f"{f(r['e2e_p50_s'])} / {f(r['e2e_p99_s'])} | {f(r['preempted_e2e_p50_s'])} / "
            f"{f(r['preempted_e2e_p99_s'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="preset or model path")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt-lens", default="32,1024", help="comma-separated: short and long prompts")
    parser.add_argument("--modes", default="recompute,swap")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--pool-fraction", type=float, default=0.5, help="the share of prompts the KV pool holds")
    parser.add_argument("--swap-space", type=float, default=4.0, help="GiB of host blocks (swap mode)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; the fastest is reported")
    parser.add_argument("--output-json", type=Path, default=None, help="also writes the .md beside it")
    args = parser.parse_args()
    command = "python " + shlex.join(["benchmarks/swap_preemption.py", *sys.argv[1:]])
    rows = []
    for prompt_len in [int(x) for x in args.prompt_lens.split(",")]:
        runs: dict[str, list[dict]] = {mode: [] for mode in args.modes.split(",")}
        for _ in range(args.repeats):  # modes interleaved, so a busy machine slows both alike
            for mode in runs:
                runs[mode].append(run(args, prompt_len, mode))
                print(json.dumps(runs[mode][-1]), flush=True)
        for tries in runs.values():  # the fastest run of each; all wall times kept
            best = min(tries, key=lambda r: r["wall_s"])
            rows.append({**best, "wall_s_all": [r["wall_s"] for r in tries]})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    md = markdown(rows, command, device)
    print(md)
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps({"command": command, "device": device, "rows": rows}, indent=2))
        args.output_json.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
