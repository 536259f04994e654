"""Sweep of the fused sampling kernel (mini_infer/kernels/sampling.py) on one CUDA GPU.

For 1, 8, 64 and 256 rows of bf16 logits over 151936 (Qwen) and 128256 (Llama 3) tokens, all rows
sampled (temperature 0.7) or all greedy, it times sample_tokens_triton with the default heuristic and a
few block / warp / slice alternatives (plus torch.argmax for greedy rows). Each configuration is
captured in a CUDA graph of at least 20 calls, the graph replayed and timed with CUDA events; the
median replay divided by the calls is the time per call, launch gaps inside a graph included. The calls
of a graph rotate over separate logits buffers that together hold twice the L2 cache, so the logits
come from HBM (--hot-l2: every call reads one buffer). GB/s counts the logits read; the ceiling is a
1 GiB device copy measured in the same run. Every configuration must give the default's tokens (and
greedy rows torch.argmax's): a mismatch is reported and makes the exit status 1.

    PYTHONPATH=. python benchmarks/sampling_sweep.py --output-json benchmarks/results/h100/sampling_sweep.json

Prints one JSON line per measurement, then a table; writes everything to --output-json when given.
"""

import argparse
import json
import math
import sys
import time

import torch
from graph_timer import capture, replay_us

from mini_infer.bench.roofline import measure_hbm_bandwidth

ROWS = (1, 8, 64, 256)
VOCABS = (151936, 128256)
TEMPERATURE = 0.7
MIN_CALLS = 20  # calls captured in one graph
MAX_CALLS = 400
REPS = 10  # timed replays of a graph
SHAPE_KWARGS = ("block_v", "num_chunks", "num_warps")  # launch_shape's overrides, in its order
DEVICE = "cuda"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts")
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="comma-separated vocabulary sizes")
    parser.add_argument("--hot-l2", action="store_true", help="every call reads the same (L2-resident) logits")
    parser.add_argument("--reps", type=int, default=REPS, help="timed graph replays per configuration")
    return parser.parse_args()


def argmax_call(buffers: list[torch.Tensor]):
    return lambda i: buffers[i % len(buffers)].argmax(dim=-1)


def sampler_call(sample, buffers: list[torch.Tensor], temperature: torch.Tensor, seeds: torch.Tensor, kwargs: dict):
    return lambda i: sample(buffers[i % len(buffers)], temperature, seeds, **kwargs)


def configs(n: int, vocab: int, sms: int) -> list[tuple[str, dict]]:
    """The default and a few alternatives, without two that launch the same shape."""
    from mini_infer.kernels.sampling import launch_shape

    default_chunks = launch_shape(n, vocab, sms)[1]
    candidates = [
        ("default", {}),
        ("old shape: 1 slice, 8192/16w", {"block_v": 8192, "num_warps": 16, "num_chunks": 1}),
        ("block 1024", {"block_v": 1024}),
        ("block 2048, 8 warps", {"block_v": 2048, "num_warps": 8}),
        ("block 4096, 8 warps", {"block_v": 4096, "num_warps": 8}),
        ("slices x2", {"num_chunks": 2 * default_chunks}),
        ("slices /2", {"num_chunks": max(1, default_chunks // 2)}),
    ]
    seen, kept = set(), []
    for name, kwargs in candidates:
        shape = launch_shape(n, vocab, sms, *(kwargs.get(k) for k in SHAPE_KWARGS))
        if shape not in seen:
            seen.add(shape)
            kept.append((name, kwargs))
    return kept


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("sampling_sweep.py needs a CUDA GPU: torch.cuda.is_available() is False (nothing was measured)")
    from mini_infer.kernels._triton import HAS_TRITON, num_sms

    if not HAS_TRITON:
        sys.exit("sampling_sweep.py needs Triton: pip install triton")
    from mini_infer.kernels import sampling
    from mini_infer.kernels.sampling import launch_shape, sample_tokens_triton

    began = time.perf_counter()
    device = torch.device(DEVICE)
    props = torch.cuda.get_device_properties(device)
    sms = num_sms(device)
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20)
    ceiling = measure_hbm_bandwidth() / 1e9
    print(json.dumps({"device": props.name, "sms": sms, "l2_bytes": l2_bytes, "copy_GBps": round(ceiling, 1)}))
    rows_list = [int(x) for x in args.rows.split(",")]
    vocabs = [int(x) for x in args.vocabs.split(",")]
    results, mismatches = [], []
    gen = torch.Generator(device=device).manual_seed(0)
    for vocab in vocabs:
        for n in rows_list:
            bytes_per_call = n * vocab * 2
            n_buffers = 1 if args.hot_l2 else min(MAX_CALLS, math.ceil(2 * l2_bytes / bytes_per_call))
            n_calls = max(MIN_CALLS, n_buffers)
            logits = torch.randn(n_buffers * n, vocab, device=device, generator=gen).mul_(3).to(torch.bfloat16)
            buffers = [logits[i * n : (i + 1) * n] for i in range(n_buffers)]
            argmax = [b.argmax(dim=-1) for b in buffers]
            seeds = torch.arange(n, dtype=torch.int64, device=device) * 7919 + 12345
            for mode, t in (("sampled", TEMPERATURE), ("greedy", 0.0)):
                temperature = torch.full((n,), t, dtype=torch.float32, device=device)
                want = None
                runs = configs(n, vocab, sms) + ([("torch.argmax", None)] if mode == "greedy" else [])
                for name, kwargs in runs:
                    if kwargs is None:
                        shape = (None, None, None, None)
                        call = argmax_call(buffers)
                    else:
                        shape = launch_shape(n, vocab, sms, *(kwargs.get(k) for k in SHAPE_KWARGS))
                        call = sampler_call(sample_tokens_triton, buffers, temperature, seeds, kwargs)
                    graph, outs = capture(call, n_calls)
                    us = replay_us(graph, n_calls, args.reps)
                    tokens = [outs[i].clone() for i in range(n_buffers)]
                    if want is None:
                        want = tokens
                    ok = all(torch.equal(a, b) for a, b in zip(tokens, want))
                    if mode == "greedy":
                        ok = ok and all(torch.equal(a, b) for a, b in zip(tokens, argmax))
                    row = {
                        "vocab": vocab,
                        "rows": n,
                        "mode": mode,
                        "config": name,
                        "block_v": shape[0],
                        "num_chunks": shape[1],
                        "chunk_len": shape[2],
                        "num_warps": shape[3],
                        "us_per_call": round(us, 2),
                        "GBps": round(bytes_per_call / (us * 1e-6) / 1e9, 1),
                        "pct_copy": round(100 * bytes_per_call / (us * 1e-6) / 1e9 / ceiling, 1),
                        "calls_per_graph": n_calls,
                        "logits_buffers": n_buffers,
                        "tokens_match": ok,
                    }
                    results.append(row)
                    if not ok:
                        mismatches.append(row)
                    print(json.dumps(row), flush=True)
            del logits, buffers, argmax
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - began
    report = {
        "device": props.name,
        "sms": sms,
        "l2_bytes": l2_bytes,
        "copy_GBps": ceiling,
        "hot_l2": args.hot_l2,
        "temperature": TEMPERATURE,
        "reps": args.reps,
        "seconds": elapsed,
        "defaults": {
            "BLOCK_V": sampling.BLOCK_V,
            "ELEMENTS_PER_THREAD": sampling.ELEMENTS_PER_THREAD,
            "PROGRAMS_PER_SM": sampling.PROGRAMS_PER_SM,
            "MAX_WARPS": sampling.MAX_WARPS,
        },
        "torch": torch.__version__,
        "results": results,
        "mismatches": mismatches,
    }
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    print_table(results, props.name, ceiling, args.hot_l2)
    print(
        f"{len(results)} measurements in {elapsed:.0f} s"
        + (f"; JSON written to {args.output_json}" if args.output_json else "")
    )
    if mismatches:
        print(f"TOKEN MISMATCH in {len(mismatches)} configurations (see 'mismatches' in the JSON)", file=sys.stderr)
        return 1
    return 0


def print_table(results: list[dict], device: str, ceiling: float, hot_l2: bool) -> None:
    where = "L2-hot logits" if hot_l2 else "logits from HBM"
    print(f"\n{device}, bf16 logits, {where}, CUDA-graph replay; copy ceiling {ceiling:.0f} GB/s; * fastest of a group")
    header = f"{'vocab':>7} {'rows':>4} {'mode':<7} {'config':<30} {'block':>5} {'warps':>5} {'slices':>6}"
    header += f" {'us/call':>8} {'GB/s':>7} {'%copy':>6}"
    print(header)
    print("-" * len(header))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["vocab"], r["rows"], r["mode"]), []).append(r)
    for group in groups.values():
        best = min(r["us_per_call"] for r in group)
        for r in group:
            mark = "*" if r["us_per_call"] == best else " "
            bad = "" if r["tokens_match"] else "  TOKENS DIFFER"
            cols = [str(r[k]) if r[k] is not None else "-" for k in ("block_v", "num_warps", "num_chunks")]
            print(
                f"{r['vocab']:>7} {r['rows']:>4} {r['mode']:<7} {r['config']:<30} {cols[0]:>5} {cols[1]:>5}"
                f" {cols[2]:>6} {r['us_per_call']:>7.1f}{mark} {r['GBps']:>7.0f} {r['pct_copy']:>6.1f}{bad}"
            )


if __name__ == "__main__":
    sys.exit(main())
