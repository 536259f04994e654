"""Each decode step's GPU time against its roofline ideal, by batch size, from a throughput run's step log.

The step log (`mini-infer bench throughput --step-log`) has each step's GPU ms and decode count; the
workload is rebuilt from its seed. With all requests admitted at once (max_num_seqs >= requests, as in
the default run), the k-th decode-only step serves the requests with more than k + 1 output tokens, each
at context prompt + k + 1; the requests are taken longest output first up to the step's decode count,
so the few steps where prefill timing shifts a request by a step are approximate. Ideal is
max(bytes / HBM, FLOPs / peak) with the HBM and peak the run measured.

    python benchmarks/step_excess.py --run throughput_qwen3-0.6b.json --steps steps_qwen3-0.6b.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from mini_infer.bench.common import load_model_config
from mini_infer.bench.roofline import Hardware, ModelShape, decode_step_cost, dtype_nbytes
from mini_infer.bench.throughput import make_workload


def bucket(batch: int) -> int:
    return min(256, 1 << (batch - 1).bit_length())


def step_excess(run: dict, steps: list[list]) -> list[dict]:
    shape = ModelShape.from_hf_config(load_model_config(run["model"]))
    hw = Hardware(run["hardware"]["hbm_gb_per_s"] * 1e9, run["hardware"]["bf16_peak_tflops"] * 1e12)
    work = run["workload"]
    workload = make_workload(work["num_prompts"], shape.vocab_size, seed=run["engine_config"].get("seed") or 0)
    pairs = sorted(((len(p), o) for p, o in zip(workload.prompts, workload.output_lens)), key=lambda x: -x[1])
    dtype_bytes = dtype_nbytes(getattr(torch, run["dtype"]))
    rows: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    decode_only = [s for s in steps if s[3] == 0 and s[2] > 0 and s[1] is not None]
    for k, (_, gpu_ms, decodes, _) in enumerate(decode_only):
        contexts = [p + k + 1 for p, o in pairs if o > k + 1][:decodes]
        row = rows[bucket(decodes)]
        row[0] += 1
        row[1] += gpu_ms
        row[2] += 1e3 * decode_step_cost(shape, contexts, dtype_bytes).ideal_seconds(hw)
    return [
        {
            "batch_up_to": b,
            "steps": n,
            "gpu_ms": g / n,
            "ideal_ms": i / n,
            "excess_ms": (g - i) / n,
            "excess_s_total": (g - i) / 1e3,
        }
        for b, (n, g, i) in sorted(rows.items())
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the throughput JSON (model, workload, hardware)")
    parser.add_argument("--steps", required=True, help="its --step-log JSON")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    with open(args.run) as f:
        run = json.load(f)
    with open(args.steps) as f:
        steps = json.load(f)["steps"]
    rows = step_excess(run, steps)
    print(f"{'batch <=':>9}{'steps':>7}{'GPU ms':>9}{'ideal ms':>10}{'excess ms':>11}{'excess s':>10}")
    for r in rows:
        print(
            f"{r['batch_up_to']:>9}{r['steps']:>7}{r['gpu_ms']:>9.2f}{r['ideal_ms']:>10.2f}"
            f"{r['excess_ms']:>11.2f}{r['excess_s_total']:>10.3f}"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"run": args.run, "steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
