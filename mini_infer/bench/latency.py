"""`mini-infer bench latency`: decode step time, tok/s and achieved HBM bandwidth per batch size.

For each batch size B, B requests with random prompts of `--input-len` tokens each generate exactly
`--output-len` tokens (ignore_eos), after an untimed run of the same shape. Only pure decode steps are
timed: steps where every one of the B requests already had its first token and gets one more. A step's
bytes are the weights (of a MoE model, only the experts the step touched, counted in an eager rerun of
the same requests: expert_usage.py) plus the KV of every request's context, so bytes / step time is the achieved
bandwidth, reported beside the bandwidth of a plain device copy measured on the spot (the gpt-fast
habit), and beside the roofline step time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mini_infer.bench.common import (
    RESULTS_DIR,
    build_engine,
    default_result_path,
    engine_kv_dtype_bytes,
    engine_shape,
    environment,
    fmt_pct,
    gc_pauses,
    hardware_dict,
    mean_step_timings,
    shut_down,
    step_log,
    write_json,
)
from mini_infer.bench.step_timer import step_timings
from mini_infer.bench.workload import Workload, make_workload

if TYPE_CHECKING:
    from mini_infer.bench.roofline import Hardware

DEFAULT_BATCH_SIZES = "1,2,4,8,16,32,64,128,256"


@dataclass
class StepRecord:
    seconds: float
    context_lens: list[int]


@dataclass
class BatchResult:
    batch_size: int
    input_len: int
    output_len: int
    wall_seconds: float
    decode_steps: list[StepRecord] = field(default_factory=list)
    bytes_per_step: list[int] = field(default_factory=list)
    ideal_step_seconds: list[float] = field(default_factory=list)
    host_gpu: dict[str, float | None] = field(default_factory=dict)
    hbm_bytes_per_s: float | None = None
    engine_steps: list[list[float | int | None]] = field(default_factory=list)  # every step, from the engine
    gc_during_run: dict[str, float | int] = field(default_factory=dict)
    experts_touched: list[float] = field(default_factory=list)  # per decode step, summed over sparse layers
    experts_touched_source: str | None = None

    @property
    def decode_seconds(self) -> float:
        return sum(s.seconds for s in self.decode_steps)

    @property
    def mean_step_seconds(self) -> float:
        return self.decode_seconds / len(self.decode_steps)

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(s.seconds for s in self.decode_steps)

    @property
    def decode_tok_per_s(self) -> float:
        return self.batch_size / self.mean_step_seconds

    @property
    def achieved_bytes_per_s(self) -> float:
        return sum(self.bytes_per_step) / self.decode_seconds

    @property
    def hbm_fraction(self) -> float | None:
        return None if self.hbm_bytes_per_s is None else self.achieved_bytes_per_s / self.hbm_bytes_per_s

    @property
    def roofline_fraction(self) -> float | None:
        return sum(self.ideal_step_seconds) / self.decode_seconds if self.ideal_step_seconds else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "wall_seconds": self.wall_seconds,
            "num_decode_steps": len(self.decode_steps),
            "mean_step_ms": 1e3 * self.mean_step_seconds,
            "median_step_ms": 1e3 * self.median_step_seconds,
            "decode_tok_per_s": self.decode_tok_per_s,
            "per_sequence_tok_per_s": 1.0 / self.mean_step_seconds,
            "mean_bytes_per_step": sum(self.bytes_per_step) / len(self.bytes_per_step),
            "achieved_gb_per_s": self.achieved_bytes_per_s / 1e9,
            "hbm_fraction": self.hbm_fraction,
            "roofline_fraction": self.roofline_fraction,
            **self.host_gpu,
            "mean_experts_touched": sum(self.experts_touched) / len(self.experts_touched)
            if self.experts_touched
            else None,
            "experts_touched_source": self.experts_touched_source,
            # the step wall times behind the mean, so one slow step shows as what it is
            "decode_step_ms": [round(1e3 * s.seconds, 3) for s in self.decode_steps],
            "gc_during_run": self.gc_during_run,
            "engine_steps": {
                "columns": ["host_ms", "gpu_ms", "num_decodes", "num_prefill_tokens"],
                "steps": self.engine_steps,
            },
        }


def _params(max_tokens: int) -> Any:
    from mini_infer import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_batch(engine: Any, workload: Workload, tag: str) -> tuple[float, list[StepRecord], list, dict]:
    """Runs one batch to completion; returns wall time, the pure decode steps, the engine's timings and the
    garbage collections during the run."""
    batch = len(workload)
    prompt_len = {f"{tag}-{i}": len(p) for i, p in enumerate(workload.prompts)}
    counts = dict.fromkeys(prompt_len, 0)
    timings = step_timings(engine)
    timings_start = len(timings) if timings is not None else 0
    decode_steps: list[StepRecord] = []
    with gc_pauses() as collections:
        start = time.perf_counter()
        for rid, prompt, out_len in zip(prompt_len, workload.prompts, workload.output_lens):
            engine.add_request(rid, {"prompt_token_ids": prompt}, _params(out_len))
        _step_until_done(engine, batch, prompt_len, counts, decode_steps)
        wall = time.perf_counter() - start
    new_timings = list(timings[timings_start:]) if timings is not None else []
    return wall, decode_steps, new_timings, collections


def _step_until_done(
    engine: Any, batch: int, prompt_len: dict[str, int], counts: dict[str, int], decode_steps: list[StepRecord]
) -> None:
    """Steps until every request finished, recording each pure decode step (all `batch` requests moved
    by exactly one token) with its wall time."""
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - step_start
        before = {o.request_id: counts[o.request_id] for o in outputs}
        for o in outputs:
            counts[o.request_id] = len(o.outputs[0].token_ids)
        pure_decode = len(outputs) == batch and all(
            before[o.request_id] >= 1 and counts[o.request_id] == before[o.request_id] + 1 for o in outputs
        )
        if pure_decode:
            decode_steps.append(StepRecord(seconds, [prompt_len[r] + before[r] for r in before]))


def measure_batch(
    engine: Any, batch_size: int, input_len: int, output_len: int, hw: Hardware | None, seed: int
) -> BatchResult:
    from mini_infer.bench.expert_usage import align_to_steps, count_experts_touched
    from mini_infer.bench.roofline import decode_step_cost

    shape, dtype_bytes = engine_shape(engine)
    kv_dtype_bytes = engine_kv_dtype_bytes(engine)
    vocab = shape.vocab_size
    # Untimed run of the very same shape (other prompts): kernels specialised on batch or context
    # length (split counts, graph sizes) compile here, not inside the timed steps.
    warm = make_workload(batch_size, vocab, seed=10_000 + seed, input_len=input_len, output_len=output_len)
    run_batch(engine, warm, f"warm{batch_size}")
    workload = make_workload(batch_size, vocab, seed=seed, input_len=input_len, output_len=output_len)
    wall, steps, timings, collections = run_batch(engine, workload, f"b{batch_size}")
    if not steps:
        raise RuntimeError(f"batch {batch_size}: no pure decode step (output_len {output_len} too short?)")
    result = BatchResult(batch_size, input_len, output_len, wall, steps, gc_during_run=collections)
    if shape.num_experts:  # a MoE step reads the experts it touches: count them (expert_usage.py)
        rerun = lambda: run_batch(engine, workload, f"experts{batch_size}")
        touched, result.experts_touched_source = align_to_steps(
            count_experts_touched(engine, rerun, batch_size), len(steps)
        )
        result.experts_touched = touched or []
    else:
        touched = None
    costs = [
        decode_step_cost(shape, s.context_lens, dtype_bytes, touched[i] if touched else None, kv_dtype_bytes)
        for i, s in enumerate(steps)
    ]
    result.bytes_per_step = [c.bytes for c in costs]
    if hw is not None:
        result.hbm_bytes_per_s = hw.hbm_bytes_per_s
        result.ideal_step_seconds = [c.ideal_seconds(hw) for c in costs]
    if timings:
        result.host_gpu = mean_step_timings(timings)
        if hasattr(timings[0], "num_decodes"):
            result.engine_steps = step_log(timings)
    return result


def print_table(results: list[BatchResult]) -> None:
    header = f"{'batch':>6}{'step ms':>10}{'tok/s':>11}{'tok/s/seq':>11}{'GB/s':>9}{'% HBM':>8}{'roofline':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.batch_size:>6}{1e3 * r.mean_step_seconds:>10.2f}{r.decode_tok_per_s:>11.1f}"
            f"{1.0 / r.mean_step_seconds:>11.1f}{r.achieved_bytes_per_s / 1e9:>9.0f}"
            f"{fmt_pct(r.hbm_fraction):>8}{fmt_pct(r.roofline_fraction):>10}"
        )


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from mini_infer.bench.roofline import measure_hardware

    batch_sizes = _batch_sizes(args.batch_sizes)
    if args.max_num_seqs is None:
        args.max_num_seqs = max(batch_sizes)
    args.output_json = args.output_json or default_result_path("latency", args.model, args.result_dir)
    on_cuda = args.device in (None, "auto", "cuda") and torch.cuda.is_available()
    hw = measure_hardware() if on_cuda else None
    engine = build_engine(args)
    if args.input_len + args.output_len > engine.max_model_len:
        raise ValueError(
            f"--input-len {args.input_len} + --output-len {args.output_len} is more than "
            f"max_model_len {engine.max_model_len}: lower one of them"
        )
    shape, dtype_bytes = engine_shape(engine)
    record: dict[str, Any] = {
        "benchmark": "latency",
        "environment": environment(),
        "hardware": hardware_dict(hw),
        "model": args.model,
        "dtype_bytes": dtype_bytes,
        "weight_bytes_per_step": shape.weight_bytes(dtype_bytes),  # a MoE model's with every expert
        "num_experts": shape.num_experts,
        "sparse_layers": shape.num_sparse_layers,
        "expert_bytes": shape.expert_params * dtype_bytes,
        "kv_bytes_per_token": shape.kv_bytes_per_token(engine_kv_dtype_bytes(engine)),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "results": [],
        "errors": {},
    }
    results = []
    for i, batch in enumerate(
        tqdm(batch_sizes, desc="batch sizes", unit="batch", leave=False, disable=args.disable_tqdm)
    ):
        try:
            seed = 1000 * (args.seed or 0) + i
            result = measure_batch(engine, batch, args.input_len, args.output_len, hw, seed)
        except Exception as error:  # e.g. a batch the KV pool cannot hold: keep the other sizes
            print(f"[latency] batch {batch} failed: {type(error).__name__}: {error}", flush=True)
            record["errors"][str(batch)] = f"{type(error).__name__}: {error}"
            continue
        results.append(result)
        record["results"].append(result.to_dict())
        write_json(args.output_json, record)
        print(
            f"[latency] batch {batch}: {1e3 * result.mean_step_seconds:.2f} ms/step, "
            f"{result.decode_tok_per_s:.1f} tok/s, HBM {fmt_pct(result.hbm_fraction)}",
            flush=True,
        )
    shut_down(engine)
    write_json(args.output_json, record)
    print()
    print(
        f"model {args.model}, input {args.input_len}, output {args.output_len}, "
        f"device {record['environment']['device']}, hardware {record['hardware'] or 'n/a'}"
    )
    print_table(results)
    print(f"results written to {args.output_json}")
    return record


def cli_entry(args: argparse.Namespace) -> int:
    """Exit status for the command line: 1 when any run failed (its error is in the JSON)."""
    return 1 if run_benchmark(args)["errors"] else 0


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from mini_infer.config import add_engine_args

    parser.add_argument(
        "--model", required=True, help="model folder, hub id, or preset name with --load-format dummy (e.g. llama-3-8b)"
    )
    parser.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES, help="comma list")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    parser.add_argument(
        "--output-json", default=None, help="where to write the results (default: RESULT_DIR/latency-MODEL-TIME.json)"
    )
    parser.add_argument("--result-dir", default=RESULTS_DIR, help="folder for results written by default")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    add_engine_args(parser)
    parser.set_defaults(func=cli_entry)
    return parser


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be a comma list of positive integers, got {text!r}")
    return sizes


def add_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser("latency", help="decode step time and HBM bandwidth per batch size")
    return configure_parser(parser)


def main(argv: list[str] | None = None) -> None:
    args = configure_parser(argparse.ArgumentParser(prog="mini-infer bench latency")).parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
