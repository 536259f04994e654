"""The engine against transformers' static `generate` on a CPU, interleaved: one process, the same requests,
each backend run --rounds times in turn, best and median wall time of each.

A shared 2-core machine's speed drifts by 2x within a minute (one `bench throughput --compare hf-static`
run read 0.54x, the next 1.09x), so single runs of each backend, one after the other, cannot resolve a
10% difference; alternating many short runs and comparing their best (the least disturbed) and medians
can. The runs are what `mini-infer bench throughput` does for `mini-infer` and `hf-static`
(bench/throughput.py, bench/hf_baseline.py); only the repetition is new here.

    python benchmarks/cpu_vs_hf.py --model ../shared/models/stories260K --num-prompts 16 --rounds 15 \\
        --output-json benchmarks/results/cpu/cpu_vs_hf_stories260K_16p.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from mini_infer.bench.common import build_engine, environment
from mini_infer.bench.hf_baseline import load_hf_model, run_hf_static
from mini_infer.bench.throughput import run_mini_infer
from mini_infer.bench.workload import make_workload
from mini_infer.config import add_engine_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (transformers loads the same one)")
    add_engine_args(parser)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()
    engine = build_engine(args)
    vocab = engine.model_config.vocab_size
    workload = make_workload(args.num_prompts, vocab, input_len=args.input_len, output_len=args.output_len)
    hf = load_hf_model(args.model, args.load_format or "auto", torch.device("cpu"), torch.float32, None)
    run_mini_infer(engine, workload.head(2), 0.0, label="warm")  # untimed, as in bench throughput
    walls: dict[str, list[float]] = {"mini-infer": [], "hf-static": []}
    for _ in range(args.rounds):
        walls["mini-infer"].append(run_mini_infer(engine, workload, 0.0).wall_seconds)
        walls["hf-static"].append(run_hf_static(hf, workload, 0.0, args.num_prompts, None).wall_seconds)
    tokens = workload.output_tokens
    summary = {
        name: {"best_tok_per_s": tokens / min(w), "median_tok_per_s": tokens / statistics.median(w)}
        for name, w in walls.items()
    }
    record = {
        "benchmark": "cpu_vs_hf",
        "command": "python " + " ".join(sys.argv),
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "output_tokens_per_run": tokens,
        "walls_s": walls,
        "summary": summary,
        "ratio_best": summary["mini-infer"]["best_tok_per_s"] / summary["hf-static"]["best_tok_per_s"],
        "ratio_median": summary["mini-infer"]["median_tok_per_s"] / summary["hf-static"]["median_tok_per_s"],
    }
    for name, s in summary.items():
        print(f"{name:>10}: best {s['best_tok_per_s']:8.0f} tok/s, median {s['median_tok_per_s']:8.0f} tok/s")
    print(f"engine / transformers: best {record['ratio_best']:.3f}, median {record['ratio_median']:.3f}")
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
