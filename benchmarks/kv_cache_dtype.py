"""KV capacity and decode latency with kv_cache_dtype "auto" (the model dtype) against "fp8" (e4m3).

For each KV cache dtype one engine of the model (dummy weights of the real shapes by default) is built
the usual way: the KV pool is sized by profiling under --gpu-memory-utilization, so "KV capacity" is the
number of token slots the pool really got (blocks x block size), and the fp8 pool should hold twice the
bf16 one's. Each dtype runs in a fresh process, so both pools are sized on the same free memory. Then
mini-infer's latency measurement (bench/latency.py: B requests of --input-len tokens,
only pure decode steps timed, after an untimed run of the same shape) gives ms per decode step. The
roofline of a step is the weights' bytes plus every request's KV context at the pool's own bytes per
token, at the copy bandwidth measured on the spot: fp8 halves the second term.

    python benchmarks/kv_cache_dtype.py --model llama-3-8b --batch-sizes 1,16,64,128 --input-len 2048 \
        --output benchmarks/results/h200/kv_cache_dtype_llama-3-8b

writes OUTPUT.json and OUTPUT.md (with this command in it). `--smoke` runs the same code on the CPU with
the tiny-llama preset in bfloat16 and a 256 KiB pool (no timing worth reading; tests/test_benchmark_scripts.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from mini_infer.bench.common import shut_down
from mini_infer.bench.latency import measure_batch
from mini_infer.bench.roofline import measure_hardware
from mini_infer.config import EngineConfig
from mini_infer.engine import LLMEngine


def weight_bytes_per_step(engine: LLMEngine) -> int:
    """Bytes of the weights one decode step reads (an untied embedding table is gathered, not read)."""
    model = engine.model_runner.model
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params if tied or p is not embed)


def run_dtype(args: argparse.Namespace, kv_cache_dtype: str, hw) -> dict:
    config = EngineConfig(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        kv_cache_dtype=kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        cpu_kv_cache_gib=args.cpu_kv_cache_gib,
        enforce_eager=args.enforce_eager,
    )
    engine = LLMEngine(config)
    pool = engine.model_runner.kv_cache
    num_blocks = engine.scheduler.block_manager.num_blocks
    kv_token = pool.block_bytes // config.block_size
    capped = num_blocks == config.max_num_seqs * -(-engine.max_model_len // config.block_size)
    record = {
        "kv_cache_dtype": kv_cache_dtype,
        "pool_dtype": str(pool.dtype).removeprefix("torch."),
        "num_blocks": num_blocks,
        "block_size": config.block_size,
        "kv_capacity_tokens": num_blocks * config.block_size,
        "kv_bytes_per_token": kv_token,
        "kv_pool_gib": num_blocks * pool.block_bytes / 2**30,
        "capacity_capped_by_max_num_seqs": capped,  # the pool never outgrows max_num_seqs full sequences
        "results": [],
    }
    print(f"[kv_cache_dtype] {kv_cache_dtype}: {record['kv_capacity_tokens']} tokens ({record})", flush=True)
    weights = weight_bytes_per_step(engine)
    for i, batch in enumerate(args.batch_sizes):
        result = measure_batch(engine, batch, args.input_len, args.output_len, hw, seed=i)
        ideal = (
            [(weights + sum(s.context_lens) * kv_token) / hw.hbm_bytes_per_s for s in result.decode_steps] if hw else []
        )
        step = result.mean_step_seconds
        row = {
            "batch_size": batch,
            "mean_step_ms": 1e3 * step,
            "median_step_ms": 1e3 * result.median_step_seconds,
            "decode_tok_per_s": result.decode_tok_per_s,
            "roofline_step_ms": 1e3 * sum(ideal) / len(ideal) if ideal else None,
            "roofline_fraction": sum(ideal) / len(ideal) / step if ideal else None,
        }
        record["results"].append(row)
        print(f"[kv_cache_dtype] {kv_cache_dtype} batch {batch}: {row}", flush=True)
    shut_down(engine)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def write_markdown(path: Path, record: dict) -> None:
    first = record["dtypes"][0]
    base_tokens = first["kv_capacity_tokens"]
    base_step = {r["batch_size"]: r["mean_step_ms"] for r in first["results"]}
    lines = [
        f"# KV cache dtype, {record['model']} ({record['device']})",
        "",
        f"Command: `{record['command']}`",
        "",
        f"Input {record['input_len']} tokens, output {record['output_len']}; gpu_memory_utilization "
        f"{record['gpu_memory_utilization']}. Roofline: weight bytes plus the KV context at the pool's bytes per "
        f"token, at the measured copy bandwidth ({record['hbm_gb_per_s'] or 0:.0f} GB/s; 0: no GPU, no roofline).",
        "",
        "| kv_cache_dtype | pool dtype | bytes/token | KV capacity (tokens) | vs first | pool GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for d in record["dtypes"]:
        capped = " (capped by max_num_seqs)" if d["capacity_capped_by_max_num_seqs"] else ""
        lines.append(
            f"| {d['kv_cache_dtype']} | {d['pool_dtype']} | {d['kv_bytes_per_token']} | {d['kv_capacity_tokens']}"
            f"{capped} | {d['kv_capacity_tokens'] / base_tokens:.2f}x | {d['kv_pool_gib']:.3f} |"
        )
    lines += [
        "",
        "| kv_cache_dtype | batch | step ms | tok/s | speed vs first | % roofline |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in record["dtypes"]:
        for r in d["results"]:
            frac = f"{100 * r['roofline_fraction']:.0f}%" if r["roofline_fraction"] else "n/a"
            lines.append(
                f"| {d['kv_cache_dtype']} | {r['batch_size']} | {r['mean_step_ms']:.2f} | "
                f"{r['decode_tok_per_s']:.1f} | {base_step[r['batch_size']] / r['mean_step_ms']:.2f}x | {frac} |"
            )
    path.write_text("\n".join(lines) + "\n")


def run_one(args: argparse.Namespace, kv_cache_dtype: str) -> dict:
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    hw = measure_hardware()
    return {
        "benchmark": "kv_cache_dtype",
        "command": shlex.join(["python", *sys.argv]),
        "model": args.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "hbm_gb_per_s": hw.hbm_bytes_per_s / 1e9 if hw else None,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "smoke": args.smoke,
        "dtypes": [run_dtype(args, kv_cache_dtype, hw)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help="preset name (with dummy weights), folder or hub id")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtypes", default="auto,fp8", help="comma list of kv_cache_dtype values")
    parser.add_argument("--batch-sizes", default="1,16,64,128")
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=64)
    # long enough that max_num_seqs full-length sequences never cap the pool below what memory allows
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--cpu-kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/h200/kv_cache_dtype_llama-3-8b", help="path stem")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny-llama in bfloat16, a 256 KiB pool")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.load_format, args.dtype = "tiny-llama", "dummy", "bfloat16"
        args.batch_sizes, args.input_len, args.output_len = "1,2", 16, 4
        args.max_model_len, args.max_num_seqs, args.cpu_kv_cache_gib, args.enforce_eager = 512, 8, 2**-12, True
    elif not torch.cuda.is_available():
        raise SystemExit("kv_cache_dtype.py measures a GPU's KV pool and decode steps (--smoke runs it on a CPU)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = args.kv_cache_dtypes.split(",")
    if len(names) > 1:  # one child process per dtype: no memory of the first engine left when the second profiles
        raw = list(sys.argv[1:] if argv is None else argv)
        records = []
        for name in names:
            child = out.with_name(f"{out.name}-{name}")
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                *raw,
                "--kv-cache-dtypes",
                name,
                "--output",
                str(child),
            ]
            subprocess.run(cmd, check=True)
            records.append(json.loads(child.with_suffix(".json").read_text()))
            for suffix in (".json", ".md"):
                child.with_suffix(suffix).unlink()
        record = {
            **records[0],
            "command": shlex.join(["python", *sys.argv]),
            "dtypes": [r["dtypes"][0] for r in records],
        }
    else:
        record = run_one(args, names[0])
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), record)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
