"""`mini-infer bench throughput`: offline throughput of a fixed request set, against the roofline and peers.

Default workload is nano-vllm's bench.py protocol: seed 0, 256 requests, prompts of random token ids
(ids drawn in [0, 10000]) with lengths uniform in [100, 1024], output lengths uniform in [100, 1024],
ignore_eos, temperature 0.6. Output tok/s counts generated tokens only, as nano-vllm does.

Backends run the same requests in one process: `mini-infer` (this engine, stepped by hand so the KV
statistics can be sampled every step), `static` (this engine admitting only into an empty batch), `sync`
(async scheduling off), `eager-prefill` (steps with prefill chunks run eagerly, without CUDA graphs),
`hf` (transformers' continuous batching with paged attention: the manager behind `generate_batch`,
fed one request per prompt so each keeps its own output length) and `hf-static` (`model.generate` on
left-padded static batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any

from mini_infer.bench.common import (
    RESULTS_DIR,
    RunResult,
    build_engine,
    default_result_path,
    environment,
    fmt_pct,
    free_device_memory,
    gc_pauses,
    hardware_dict,
    load_model_config,
    mean_step_timings,
    shut_down,
    step_log,
    triton_compiles,
    write_json,
)
from mini_infer.bench.step_timer import step_timings
from mini_infer.bench.workload import NANO_VLLM_LENGTHS, Workload, fit_lengths, make_workload

__all__ = ["Workload", "make_workload", "make_plan", "run_benchmark", "static_step_bound"]

BACKENDS = ("mini-infer", "hf", "hf-static")
COMPARE_CHOICES = ("continuous", "static", "sync", "eager-prefill", "hf", "hf-static")
LOWER_BOUND = " (lower bound: transformers stopped at its time limit)"


# --------------------------------------------------------------------------------------------- mini-infer


def _sampling_params(temperature: float, max_tokens: int) -> Any:
    from mini_infer import SamplingParams

    return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, output_kind="final_only")


def warm_up_engine(engine: Any, workload: Workload) -> None:
    """A short untimed run so one-time costs (kernel compiles, allocator growth) stay out of the timing:
    8 requests with other prompts of the workload's own prompt lengths, 16 output tokens each."""
    vocab = engine.model_config.vocab_size
    lengths = sorted({len(p) for p in workload.prompts})
    picks = [lengths[round(i * (len(lengths) - 1) / 7)] for i in range(8)]
    rng = random.Random(12345)
    warm = Workload(
        [[rng.randrange(vocab) for _ in range(n)] for n in picks], [min(16, max(workload.output_lens))] * len(picks)
    )
    run_mini_infer(engine, warm, temperature=0.6, label="warmup")


def run_mini_infer(
    engine: Any, workload: Workload, temperature: float, label: str = "mini-infer", progress: bool = False
) -> RunResult:
    """Adds every request, then steps until done, sampling the KV statistics after each step. With
    `progress`, a bar on stderr counts the output tokens (updated at most ten times a second)."""
    from tqdm.auto import tqdm

    stats0 = engine.stats
    timings = step_timings(engine)
    timings_start = len(timings) if timings is not None else 0
    utilisation: list[float] = []
    live_fraction_of_pool: list[float] = []
    generated: dict[str, int] = {}
    steps = 0
    block_size = engine.config.block_size
    bar = tqdm(total=workload.output_tokens, desc=label, unit="tok", disable=not progress, leave=False)
    with bar, triton_compiles() as compiled, gc_pauses() as collections:
        start = time.perf_counter()
        for i, (prompt, out_len) in enumerate(zip(workload.prompts, workload.output_lens)):
            params = _sampling_params(temperature, out_len)
            engine.add_request(f"{label}-{i}", {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    generated[output.request_id] = len(output.outputs[0].token_ids)
            steps += 1
            stats = engine.stats
            bar.update(stats.generation_tokens - stats0.generation_tokens - bar.n)
            if stats.num_kv_blocks_used > 0:
                utilisation.append(stats.num_live_tokens / (stats.num_kv_blocks_used * block_size))
                live_fraction_of_pool.append(stats.num_live_tokens / (stats.num_kv_blocks_total * block_size))
        wall = time.perf_counter() - start
    stats1 = engine.stats
    extra: dict[str, Any] = {
        "steps": steps,
        "finished_requests": len(generated),
        "num_preemptions": stats1.num_preemptions - stats0.num_preemptions,
        "peak_kv_pool_fraction_live": max(live_fraction_of_pool, default=None),
        "num_kv_blocks_total": stats1.num_kv_blocks_total,
        "block_size": block_size,
        "static_batching": bool(getattr(engine.config, "static_batching", False)),
        "max_num_seqs": engine.config.max_num_seqs,
        "triton_compiles_during_run": compiled,
        "gc_during_run": collections,
    }
    run_timings = timings[timings_start:] if timings is not None else []
    if run_timings:
        extra.update(mean_step_timings(run_timings))
    return RunResult(
        steps=step_log(run_timings) if run_timings else None,
        backend=label,
        num_requests=len(workload),
        wall_seconds=wall,
        prompt_tokens=workload.prompt_tokens,
        output_tokens=sum(generated.values()),
        kv_slot_utilisation=sum(utilisation) / len(utilisation) if utilisation else None,
        extra=extra,
    )


# --------------------------------------------------------------------------------------------- transformers


# --------------------------------------------------------------------------------------------- driver


@dataclass
class Plan:
    """One run to do: which backend, on how many of the workload's requests."""

    label: str
    backend: str
    num_requests: int
    static_batching: bool = False
    sync: bool = False  # async_scheduling off: each step read back before the next is queued
    eager_prefill: bool = False  # cuda_graph_prefill off: steps with prefill chunks run eagerly


def _mini_infer_label(static_batching: bool, sync: bool = False, eager_prefill: bool = False) -> str:
    return (
        "mini-infer"
        + ("-static" if static_batching else "")
        + ("-sync" if sync else "")
        + ("-eager-prefill" if eager_prefill else "")
    )


def make_plan(args: argparse.Namespace, num_prompts: int) -> tuple[str, list[Plan]]:
    """The main run's label and every run to do.

    HF runs may use a prefix subset (`--hf-num-prompts`); the main mini-infer run is then repeated on
    that same subset, so every ratio compares equal workloads. Runs sharing an engine or a model are
    grouped so each is built once.
    """
    hf_n = min(args.hf_num_prompts or num_prompts, num_prompts)
    main_static = bool(args.static_batching)
    if args.backend == "mini-infer":
        main = Plan(_mini_infer_label(main_static), "mini-infer", num_prompts, main_static)
    else:
        label = args.backend if hf_n == num_prompts else f"{args.backend}@{hf_n}"
        main = Plan(label, args.backend, hf_n)
    plans = [main]
    for name in args.compare or []:
        if name in ("continuous", "static"):
            static = name == "static"
            plans.append(Plan(_mini_infer_label(static), "mini-infer", num_prompts, static))
        elif name == "sync":
            plans.append(Plan(_mini_infer_label(main_static, True), "mini-infer", num_prompts, main_static, True))
        elif name == "eager-prefill":
            plans.append(
                Plan(
                    _mini_infer_label(main_static, eager_prefill=True),
                    "mini-infer",
                    num_prompts,
                    main_static,
                    eager_prefill=True,
                )
            )
        else:
            if hf_n < num_prompts and args.backend == "mini-infer":
                plans.append(Plan(f"{main.label}@{hf_n}", "mini-infer", hf_n, main_static))
            plans.append(Plan(name if hf_n == num_prompts else f"{name}@{hf_n}", name, hf_n))
    unique = list({p.label: p for p in plans}.values())
    order = {"mini-infer": 0, "hf": 1, "hf-static": 1}
    return main.label, sorted(
        unique, key=lambda p: (order[p.backend], p.static_batching, p.sync, p.eager_prefill, -p.num_requests)
    )


def static_step_bound(output_lens: list[int], max_num_seqs: int) -> dict[str, float | int]:
    """The most continuous batching can gain over static batching on these requests, in decode steps.

    Static batching runs waves of max_num_seqs requests in arrival order, each as many steps as its
    longest output; continuous batching needs at least total output / max_num_seqs steps, and at least
    the longest output. With every step costing the same (the best case for continuous batching: a
    static step that carries few sequences costs as much as a full one), the speedup is at most the ratio
    of the two; where per-step cost grows with the batch, as in KV-bound decode, it is less.
    """
    waves = [output_lens[i : i + max_num_seqs] for i in range(0, len(output_lens), max_num_seqs)]
    static_steps = sum(max(w) for w in waves)
    continuous_steps = max(-(-sum(output_lens) // max_num_seqs), max(output_lens, default=0))
    return {
        "static_steps": static_steps,
        "continuous_steps": continuous_steps,
        "max_speedup": static_steps / continuous_steps if continuous_steps else 1.0,
    }


def _ratios(results: list[RunResult], main_label: str) -> dict[str, float]:
    """Main tok/s over each other run's tok/s, each against the main run on the same requests.

    A peer stopped at its time limit did not finish: the ratio against it is a lower bound, and its key
    says so."""
    main_base = main_label.split("@")[0]
    main_by_size = {r.num_requests: r for r in results if r.backend.split("@")[0] == main_base}
    ratios = {}
    for r in results:
        main = main_by_size.get(r.num_requests)
        if main is not None and r is not main and r.backend.split("@")[0] != main_base:
            bound = LOWER_BOUND if r.extra.get("stopped_at_time_limit") is not None else ""
            ratios[f"{main.backend} / {r.backend}{bound}"] = main.output_tok_per_s / r.output_tok_per_s
    return ratios


def print_table(results: list[RunResult], ratios: dict[str, float]) -> None:
    header = (
        f"{'backend':<22}{'reqs':>6}{'wall s':>9}{'out tok/s':>12}{'total tok/s':>13}{'roofline':>10}{'KV util':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        kv = fmt_pct(r.kv_slot_utilisation) if r.kv_slot_utilisation is not None else "-"
        print(
            f"{r.backend:<22}{r.num_requests:>6}{r.wall_seconds:>9.2f}{r.output_tok_per_s:>12.1f}"
            f"{r.total_tok_per_s:>13.1f}{fmt_pct(r.roofline_fraction):>10}{kv:>9}"
        )
    for name, value in ratios.items():
        print(f"ratio {name}: {'>= ' if 'lower bound' in name else ''}{value:.2f}x")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mini_infer.bench.hf_baseline import load_hf_model, run_hf_continuous, run_hf_static, shut_down_hf
    from mini_infer.bench.roofline import (
        Hardware,
        IdealEstimate,
        ModelShape,
        dtype_nbytes,
        ideal_workload_time,
        measure_hardware,
    )
    from mini_infer.config import EngineConfig
    from mini_infer.model_loader import checkpoint_dtype

    base = EngineConfig.from_cli_args(args)
    hf_config = load_model_config(args.model, base.load_format)
    shape = ModelShape.from_hf_config(hf_config)
    max_model_len = base.max_model_len or getattr(hf_config, "max_position_embeddings", None) or 2048
    lengths, note = fit_lengths(vars(args), max_model_len)
    if note:
        print(f"[throughput] {note}", flush=True)
    args.output_json = args.output_json or default_result_path("throughput", args.model, args.result_dir)
    dtype = base.resolve_dtype(checkpoint_dtype(hf_config))
    device = base.resolved_device
    hw: Hardware | None = measure_hardware() if device.type == "cuda" else None
    workload = make_workload(
        args.num_prompts, shape.vocab_size, seed=args.seed if args.seed is not None else 0, **lengths
    )
    main_label, plans = make_plan(args, len(workload))
    ideals: dict[int, IdealEstimate] = {}
    record: dict[str, Any] = {
        "benchmark": "throughput",
        "environment": environment(),
        "hardware": hardware_dict(hw),
        "model": args.model,
        "shape": dataclasses.asdict(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "workload": {
            "num_prompts": len(workload),
            "prompt_tokens": workload.prompt_tokens,
            "output_tokens": workload.output_tokens,
            "temperature": args.temperature,
            "ignore_eos": True,
            "input_len": lengths["input_len"] or [lengths["min_input_len"], lengths["max_input_len"]],
            "output_len": lengths["output_len"] or [lengths["min_output_len"], lengths["max_output_len"]],
        },
        "engine_config": dataclasses.asdict(base),
        "runs": [],
        "errors": {},
    }
    if hw is not None:
        for n in sorted({p.num_requests for p in plans}):
            ideals[n] = ideal_workload_time(
                shape, hw, workload.head(n).shape_pairs(), base.max_num_seqs, dtype_nbytes(dtype)
            )
        record["roofline_ideal"] = {str(n): est.to_dict() for n, est in ideals.items()}
    if any(p.static_batching for p in plans):
        record["static_step_bound"] = static_step_bound(workload.output_lens, base.max_num_seqs)

    results: list[RunResult] = []
    engine, engine_kind = None, None
    hf_model = None
    for plan in plans:
        sub = workload.head(plan.num_requests)
        print(f"[throughput] {plan.label}: {len(sub)} requests, {sub.output_tokens} output tokens", flush=True)
        try:
            if plan.backend == "mini-infer":
                kind = (plan.static_batching, plan.sync, plan.eager_prefill)
                if engine is None or engine_kind != kind:
                    if engine is not None:
                        shut_down(engine)
                        engine = None
                        free_device_memory()
                    overrides = {"static_batching": plan.static_batching}
                    if plan.sync:
                        overrides["async_scheduling"] = False
                    if plan.eager_prefill:
                        overrides["cuda_graph_prefill"] = False
                    engine = build_engine(args, **overrides)
                    engine_kind = kind
                    warm_up_engine(engine, workload)
                result = run_mini_infer(engine, sub, args.temperature, label=plan.label, progress=not args.disable_tqdm)
            else:
                if engine is not None:
                    shut_down(engine)
                    engine = None
                    free_device_memory()
                    if torch.cuda.is_available():
                        held = torch.cuda.memory_reserved() / 2**30
                        record["cuda_gib_held_after_engine_release"] = held
                        print(f"[throughput] {held:.2f} GiB still reserved after releasing the engine")
                if hf_model is None:
                    hf_model = load_hf_model(args.model, base.load_format, device, dtype, args.hf_attn_implementation)
                if plan.backend == "hf":
                    result = run_hf_continuous(
                        hf_model, sub, args.temperature, args.hf_time_limit, progress=not args.disable_tqdm
                    )
                else:
                    result = run_hf_static(
                        hf_model,
                        sub,
                        args.temperature,
                        args.hf_static_batch_size,
                        args.hf_cache_implementation,
                        progress=not args.disable_tqdm,
                    )
                result.backend = plan.label
        except Exception as error:  # one failing backend must not lose the others' numbers
            traceback.print_exc()
            print(f"[throughput] {plan.label} failed: {type(error).__name__}: {error}", flush=True)
            record["errors"][plan.label] = f"{type(error).__name__}: {error}"
            write_json(args.output_json, record)
            continue
        if plan.num_requests in ideals:
            result.ideal_seconds = ideals[plan.num_requests].seconds
        if plan.num_requests < len(workload):
            result.extra["note"] = f"subset: first {plan.num_requests} of {len(workload)} requests"
        results.append(result)
        record["runs"].append(result.to_dict())
        if args.step_log and plan.label == main_label and result.steps is not None:
            write_json(
                args.step_log,
                {
                    "command": record["environment"].get("command"),
                    "backend": plan.label,
                    "columns": ["host_ms", "gpu_ms", "num_decodes", "num_prefill_tokens"],
                    "steps": result.steps,
                },
            )
        record["ratios"] = _ratios(results, main_label)
        print(
            f"[throughput] {plan.label}: {result.wall_seconds:.2f}s, "
            f"{result.output_tok_per_s:.1f} out tok/s, roofline {fmt_pct(result.roofline_fraction)}",
            flush=True,
        )
        if (limit := result.extra.get("stopped_at_time_limit")) is not None:
            print(
                f"[throughput] {plan.label} stopped at its {limit:g} s limit with "
                f"{result.extra['finished_requests']} of {len(sub)} requests finished: its tok/s and "
                "roofline above are upper bounds",
                flush=True,
            )
        write_json(args.output_json, record)
    if engine is not None:
        shut_down(engine)
    if hf_model is not None:
        shut_down_hf(hf_model)
    record["ratios"] = _ratios(results, main_label)
    write_json(args.output_json, record)
    print()
    print(
        f"model {args.model} ({record['dtype']}), device {record['environment']['device']}, "
        f"hardware {record['hardware'] or 'n/a (no roofline on CPU)'}"
    )
    print_table(results, record["ratios"])
    if bound := record.get("static_step_bound"):
        print(
            f"static batching: {bound['static_steps']} decode steps, continuous: at least "
            f"{bound['continuous_steps']}; at equal step cost, at most {bound['max_speedup']:.2f}x"
        )
    print(f"results written to {args.output_json}")
    return record


def cli_entry(args: argparse.Namespace) -> int:
    """Exit status for the command line: 1 when any run failed (its error is in the JSON)."""
    return 1 if run_benchmark(args)["errors"] else 0


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from mini_infer.config import add_engine_args

    parser.add_argument(
        "--model", required=True, help="model folder, hub id, or preset name with --load-format dummy (e.g. qwen3-0.6b)"
    )
    workload = parser.add_argument_group(
        "workload",
        "nano-vllm's protocol by default; lengths left unset are scaled down to fit a model "
        "whose max_model_len is under 2048",
    )
    workload.add_argument("--num-prompts", type=int, default=256, help="requests in the run")
    workload.add_argument("--input-len", type=int, default=None, help="fixed prompt length")
    workload.add_argument("--output-len", type=int, default=None, help="fixed output length")
    for flag, default in NANO_VLLM_LENGTHS.items():
        workload.add_argument(
            "--" + flag.replace("_", "-"), type=int, default=None, help=f"(default: {default}, scaled to the model)"
        )
    workload.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    bench = parser.add_argument_group("backends")
    bench.add_argument("--backend", choices=BACKENDS, default="mini-infer")
    bench.add_argument(
        "--compare",
        type=_compare_list,
        default=[],
        help=f"comma list of {','.join(COMPARE_CHOICES)} to run after the main backend",
    )
    bench.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="transformers backends run the first N requests only (mini-infer reruns them)",
    )
    bench.add_argument("--hf-static-batch-size", type=int, default=64)
    bench.add_argument("--hf-cache-implementation", default=None, help="e.g. static (hf-static only)")
    bench.add_argument("--hf-attn-implementation", default=None, help="e.g. sdpa, eager (transformers' default)")
    bench.add_argument(
        "--hf-time-limit",
        type=_seconds,
        default=None,
        help="stop transformers' continuous batching after this many seconds; the ratio "
        "against it is then a lower bound",
    )
    bench.add_argument(
        "--output-json",
        default=None,
        help="where to write the results (default: RESULT_DIR/throughput-MODEL-TIME.json)",
    )
    bench.add_argument("--result-dir", default=RESULTS_DIR, help="folder for results written by default")
    bench.add_argument("--disable-tqdm", action="store_true", help="no progress bars")
    bench.add_argument(
        "--step-log",
        default=None,
        help="write the main run's per-step host ms, GPU ms, decodes and prefill tokens here",
    )
    add_engine_args(parser)
    parser.set_defaults(func=cli_entry)
    return parser


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a time limit cannot be negative, got {text}")
    return value


def _compare_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in COMPARE_CHOICES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown --compare entries {bad}; choose from {COMPARE_CHOICES}")
    return names


def add_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser("throughput", help="offline throughput vs roofline and transformers")
    return configure_parser(parser)


def main(argv: list[str] | None = None) -> None:
    parser = configure_parser(argparse.ArgumentParser(prog="mini-infer bench throughput"))
    args = parser.parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
