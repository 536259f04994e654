"""A short markdown summary of a folder of benchmark JSON files; for GPU runs, the H100 targets beside them.

Usage: python -m mini_infer.bench.report DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _load(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append((path.name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as error:
            print(f"skipping {path.name}: {error}")
    return records


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def latency_lines(name: str, record: dict[str, Any]) -> list[str]:
    rows = sorted(record["results"], key=lambda r: r["batch_size"])
    timed = any(r.get("mean_step_host_ms") is not None for r in rows)
    lines = [
        f"### {name}: `{record['model']}` decode, input {record['input_len']}, output {record['output_len']}",
        "",
        "| batch | ms/step | tok/s | tok/s/seq | GB/s | % HBM | % roofline |"
        + (" host ms | GPU ms |" if timed else ""),
        "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if timed else ""),
    ]
    for r in rows:
        split = f" {_ms(r.get('mean_step_host_ms'))} | {_ms(r.get('mean_step_gpu_ms'))} |" if timed else ""
        lines.append(
            f"| {r['batch_size']} | {r['mean_step_ms']:.2f} | {r['decode_tok_per_s']:.0f} | "
            f"{r['per_sequence_tok_per_s']:.1f} | {r['achieved_gb_per_s']:.0f} | "
            f"{_pct(r['hbm_fraction'])} | {_pct(r['roofline_fraction'])} |{split}"
        )
    for batch, error in record.get("errors", {}).items():
        lines.append(f"| {batch} | failed: {error} | | | | | |")
    return lines


def throughput_lines(name: str, record: dict[str, Any]) -> list[str]:
    work = record["workload"]
    cfg = record.get("engine_config", {})
    lines = [
        f"### {name}: `{record['model']}` ({record['dtype']}), {work['num_prompts']} requests, "
        f"max_num_seqs {cfg.get('max_num_seqs')}",
        "",
        "| backend | requests | wall s | output tok/s | total tok/s | % roofline | KV slot util |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["runs"]:
        kv = _pct(r["kv_slot_utilisation"]) if r.get("kv_slot_utilisation") is not None else "-"
        stopped = r.get("extra", {}).get("stopped_at_time_limit") is not None
        at_most = "≤ " if stopped else ""  # stopped unfinished: the whole run takes longer than this
        lines.append(
            f"| {r['backend']}{' (stopped at its time limit)' if stopped else ''} | "
            f"{r['num_requests']} | {'> ' if stopped else ''}{r['wall_seconds']:.2f} | "
            f"{at_most}{r['output_tok_per_s']:.0f} | {at_most}{r['total_tok_per_s']:.0f} | "
            f"{at_most}{_pct(r['roofline_fraction'])} | {kv} |"
        )
    for label, error in record.get("errors", {}).items():
        lines.append(f"| {label} | failed: {error} | | | | | |")
    for r in record["runs"]:
        extra = r.get("extra", {})
        if extra.get("mean_step_host_ms") is not None:
            host, gpu = _ms(extra["mean_step_host_ms"]), _ms(extra.get("mean_step_gpu_ms"))
            line = f"\n{r['backend']}: {extra['steps']} steps, host {host} ms/step, GPU {gpu} ms/step"
            if extra.get("prefill_steps"):
                if "prefill_steps_gpu_seconds" in extra:
                    line += (
                        f"; {extra['prefill_steps']} steps with prefill: GPU "
                        f"{extra['prefill_steps_gpu_seconds']:.2f} s, "
                        f"host {extra['prefill_steps_host_seconds']:.2f} s"
                    )
                else:  # results written before the split: host + GPU summed
                    line += f"; {extra['prefill_steps']} steps with prefill took {extra['prefill_steps_seconds']:.2f} s"
            lines.append(line)
    for ratio, value in record.get("ratios", {}).items():
        lines.append(f"\nratio {ratio}: **{'≥ ' if 'lower bound' in ratio else ''}{value:.2f}x**")
    if bound := record.get("static_step_bound"):
        lines.append(
            f"\nstatic batching needs {bound['static_steps']} decode steps, continuous at least "
            f"{bound['continuous_steps']}: at equal step cost continuous batching gains at most "
            f"{bound['max_speedup']:.2f}x on these requests"
        )
    return lines


def target_lines(records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The project's H100 targets next to what the GPU runs' files show (none for CPU runs: the targets are
    for one H100, and a CPU figure beside them means nothing). Files are read in name order and the first
    with a figure for a target gives it, so `throughput_qwen3-0.6b.json` speaks before its `_repeat*`
    and other suffixed companions."""
    found: dict[str, str] = {}
    records = [(name, rec) for name, rec in records if rec.get("hardware")]  # measured on a GPU
    if not records:
        return []
    for _, rec in records:
        model = str(rec.get("model", "")).lower()
        if rec.get("benchmark") == "latency" and "llama-3-8b" in model:
            one = [r for r in rec["results"] if r["batch_size"] == 1]
            if one:
                found.setdefault(
                    "batch-1 Llama-3-8B decode >= 80% of HBM roofline",
                    f"{_pct(one[0]['hbm_fraction'])} ({one[0]['decode_tok_per_s']:.0f} tok/s)",
                )
        if rec.get("benchmark") != "throughput":
            continue
        runs = {r["backend"]: r for r in rec["runs"]}
        main = runs.get("mini-infer")
        if main and rec.get("engine_config", {}).get("max_num_seqs", 0) >= rec["workload"]["num_prompts"]:
            if "qwen3-0.6b" in model:
                found.setdefault(
                    "Qwen3-0.6B 256 requests >= 20,000 output tok/s, >= 75% roofline",
                    f"{main['output_tok_per_s']:.0f} tok/s, {_pct(main['roofline_fraction'])}",
                )
            if "llama-3-8b" in model:
                found.setdefault("Llama-3-8B 256 requests >= 75% roofline", _pct(main["roofline_fraction"]))
            if main.get("kv_slot_utilisation") is not None:
                found.setdefault(f"KV slot utilisation >= 95% ({rec['model']})", _pct(main["kv_slot_utilisation"]))
        for ratio, value in rec.get("ratios", {}).items():
            if "llama-3-8b" in model and ("/ hf " in ratio or ratio.endswith("/ hf") or "/ hf@" in ratio):
                at_least = "≥ " if "lower bound" in ratio else ""
                found.setdefault(f"Llama-3-8B >= 25x transformers generate_batch ({ratio})", f"{at_least}{value:.2f}x")
            if ratio == "mini-infer / mini-infer-static":
                found.setdefault(f"continuous vs static >= 3x ({rec['model']})", f"{value:.2f}x")
    lines = ["### H100 targets", "", "| target | measured |", "|---|---|"]
    lines += [f"| {target} | {value} |" for target, value in found.items()] or ["| (no matching results) | |"]
    return lines


def report(folder: str | Path) -> str:
    records = _load(Path(folder))
    lines: list[str] = []
    for name, rec in records:
        kind = rec.get("benchmark")
        if kind == "latency" and rec.get("results"):
            lines += latency_lines(name, rec) + [""]
        elif kind == "throughput" and (rec.get("runs") or rec.get("errors")):
            lines += throughput_lines(name, rec) + [""]
    env = next((rec["environment"] for _, rec in records if "environment" in rec), None)
    if env:
        lines.append(
            f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}"
        )
        lines.append("")
    return "\n".join(lines + target_lines(records))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print(report(args[0] if args else "."))


if __name__ == "__main__":
    main()
