"""Decode speed of W8A8 against the model dtype: tok/s per batch size and % of each scheme's own roofline.

For each quantization (none, fp8, int8) one engine of the model (dummy weights of the real shapes by
default) runs mini-infer's latency measurement (bench/latency.py: B requests, only pure decode steps timed,
after an untimed run of the same shape). The roofline step time is the bytes a step must read at the
measured copy bandwidth: the engine's stored weights as they are (8-bit projections and their scales, the
LM head and norms in the model dtype; an untied embedding table is not read in full), plus every request's
KV context in the model dtype. So "% roofline" is against the halved bytes, not the bf16 ones.

    python benchmarks/quant_decode.py --model llama-3-8b --batch-sizes 1,16,64 \
        --output benchmarks/results/h200/quant_decode_llama-3-8b

writes OUTPUT.json and OUTPUT.md (with this command in it). `--act-quant fused,unfused` runs each 8-bit
scheme twice, with the activation quantization fused into the norms / SiLU-and-mul and without it
(MINI_INFER_FUSE_ACT_QUANT=0, quantization/fused_act_quant.py), and adds the unfused / fused step-time
ratio to the table. `--smoke` runs the same code on the CPU (tiny-llama, float32, no roofline; no timing
worth reading: tests/test_benchmark_scripts.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from mini_infer.bench.common import shut_down
from mini_infer.bench.latency import measure_batch
from mini_infer.bench.roofline import measure_hardware
from mini_infer.config import EngineConfig
from mini_infer.engine import LLMEngine
from mini_infer.quantization.fused_act_quant import FUSE_ENV


def stored_bytes_read(engine: LLMEngine) -> int:
    """Bytes of the weights one decode step streams, as the engine stores them."""
    model = engine.model_runner.model
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p is embed and not tied:  # gathered rows only
            continue
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(engine: LLMEngine) -> int:
    runner = engine.model_runner
    return runner.kv_cache.block_bytes // engine.config.block_size


def fused_ops(engine: LLMEngine) -> int:
    """Norms / SiLU-and-mul that emit their projections' 8-bit input in this engine."""
    return sum(getattr(m, "output_quant_dtype", None) is not None for m in engine.model_runner.model.modules())


def run_scheme(args: argparse.Namespace, quantization: str | None, act_quant: str, hw) -> dict:
    config = EngineConfig(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        quantization=quantization,
        max_num_seqs=max(args.batch_sizes),
        max_model_len=args.input_len + args.output_len + 16,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        cpu_kv_cache_gib=2**-10 if args.smoke else 1.0,
    )
    os.environ[FUSE_ENV] = "1" if act_quant == "fused" else "0"  # read when the weights load
    engine = LLMEngine(config)
    weights, kv_token = stored_bytes_read(engine), kv_bytes_per_token(engine)
    label = f"{quantization or 'none'}" + (f" ({act_quant})" if quantization else "")
    rows = []
    for i, batch in enumerate(args.batch_sizes):
        result = measure_batch(engine, batch, args.input_len, args.output_len, hw, seed=i)
        ideal = [
            (weights + sum(s.context_lens) * kv_token) / hw.hbm_bytes_per_s if hw else None for s in result.decode_steps
        ]
        step = result.mean_step_seconds
        ideal_mean = sum(ideal) / len(ideal) if hw else None
        rows.append(
            {
                "batch_size": batch,
                "mean_step_ms": 1e3 * step,
                "decode_tok_per_s": result.decode_tok_per_s,
                "roofline_step_ms": 1e3 * ideal_mean if hw else None,
                "roofline_fraction": ideal_mean / step if hw else None,
            }
        )
        print(f"[quant_decode] {label} batch {batch}: {rows[-1]}", flush=True)
    record = {
        "quantization": quantization or "none",
        "act_quant": act_quant if quantization else None,
        "fused_ops": fused_ops(engine),
        "weight_bytes_per_step": weights,
        "kv_bytes_per_token": kv_token,
        "results": rows,
    }
    shut_down(engine)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def write_markdown(path: Path, record: dict) -> None:
    first = record["schemes"][0]
    base = {r["batch_size"]: r["decode_tok_per_s"] for r in first["results"]}
    unfused = {
        (scheme["quantization"], r["batch_size"]): r["mean_step_ms"]
        for scheme in record["schemes"]
        if scheme["act_quant"] == "unfused"
        for r in scheme["results"]
    }
    hbm = f"{record['hbm_gb_per_s']:.0f} GB/s" if record["hbm_gb_per_s"] else "not measured (--smoke)"
    lines = [
        f"# W8A8 decode, {record['model']} ({record['device']})",
        "",
        f"Command: `{record['command']}`",
        "",
        f"Copy bandwidth measured on the spot: {hbm}. Roofline: the stored weight "
        "bytes (8-bit projections + scales, model-dtype head/norms) plus the KV context per step. Activation "
        "quantization fused into the norms and SiLU-and-mul, or not (`act quant`; ops: how many emit 8-bit "
        "values); unfused / fused: that scheme's unfused step time over this one's.",
        "",
        f"| quantization | act quant (ops) | weight GB/step | batch | step ms | tok/s | vs {first['quantization']} "
        "| % roofline | unfused / fused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scheme in record["schemes"]:
        act = f"{scheme['act_quant']} ({scheme['fused_ops']})" if scheme["act_quant"] else "-"
        for r in scheme["results"]:
            frac = f"{100 * r['roofline_fraction']:.0f}%" if r["roofline_fraction"] else "n/a"
            other = unfused.get((scheme["quantization"], r["batch_size"]))
            ratio = f"{other / r['mean_step_ms']:.3f}" if scheme["act_quant"] == "fused" and other else "-"
            lines.append(
                f"| {scheme['quantization']} | {act} | {scheme['weight_bytes_per_step'] / 1e9:.2f} | "
                f"{r['batch_size']} | {r['mean_step_ms']:.2f} | {r['decode_tok_per_s']:.1f} | "
                f"{r['decode_tok_per_s'] / base[r['batch_size']]:.2f}x | {frac} | {ratio} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help="preset name (with dummy weights), folder or hub id")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantizations", default="none,fp8,int8", help="comma list; none = the model dtype")
    parser.add_argument(
        "--act-quant",
        default="fused",
        help="comma list of fused / unfused: each 8-bit scheme runs once per entry (the engine's default: fused)",
    )
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/h200/quant_decode_llama-3-8b", help="path stem")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny-llama in float32, batches 1 and 2")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.load_format, args.dtype, args.enforce_eager = "tiny-llama", "dummy", "float32", True
        args.batch_sizes, args.input_len, args.output_len = "1,2", 16, 4
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.act_quant.split(",")
    if not modes or any(m not in ("fused", "unfused") for m in modes):
        raise SystemExit(f"--act-quant takes fused and/or unfused, got {args.act_quant!r}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("quant_decode.py measures GPU decode: no CUDA device here (--smoke runs it on a CPU)")
    hw = None if args.smoke else measure_hardware()
    record = {
        "benchmark": "quant_decode",
        "command": shlex.join(["python", *sys.argv]),
        "model": args.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu",
        "torch": torch.__version__,
        "hbm_gb_per_s": hw.hbm_bytes_per_s / 1e9 if hw else None,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "schemes": [],
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get(FUSE_ENV)
    try:
        for name in args.quantizations.split(","):
            quantization = None if name == "none" else name
            for mode in modes if quantization else modes[:1]:
                record["schemes"].append(run_scheme(args, quantization, mode, hw))
                out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        if saved is None:
            os.environ.pop(FUSE_ENV, None)
        else:
            os.environ[FUSE_ENV] = saved
    write_markdown(out.with_suffix(".md"), record)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
