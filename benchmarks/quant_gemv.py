"""Small-batch W8A8 linears on Llama-3-8B's projections: bf16 cuBLAS against the fused 8-bit GEMV (its tile
configs swept) and against activation quant + torch._scaled_mm / torch._int_mm, in microseconds (triton's
do_bench, median).

    python benchmarks/quant_gemv.py --output benchmarks/results/h200/quant_gemv

writes OUTPUT.json and OUTPUT.md.
"""

# ruff: noqa: B023  (every lambda is timed right where it is made)
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mini_infer.kernels.act_quant import act_quant_ref, act_quant_triton
from mini_infer.kernels.scaled_mm import w8a8_gemv_triton, w8a8_mm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
CONFIGS = [(bn, bk) for bn in (4, 8, 16, 32) for bk in (128, 256, 512)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--output", default="benchmarks/results/h200/quant_gemv", help="path stem")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("quant_gemv.py times GPU kernels: no CUDA device here")
    from triton.testing import do_bench

    rows_list = [int(r) for r in args.rows.split(",")]
    record = {"command": shlex.join(["python", *sys.argv]), "device": torch.cuda.get_device_name(), "results": []}
    lines = ["| proj | rows | bf16 us | fp8 gemv us (best config) | int8 gemv us | fp8 quant+_scaled_mm us |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q8, s8 = act_quant_ref(w, torch.float8_e4m3fn)
        qi, si = act_quant_ref(w, torch.int8)
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = do_bench(lambda: F.linear(x, w), return_mode="median") * 1e3
            row = {"proj": name, "rows": m, "bf16_us": bf16, "configs": {}}
            if m <= 8:
                for bn, bk in CONFIGS:
                    cfg = (min(8, 1 << (m - 1).bit_length()), bn, bk)
                    try:
                        t = do_bench(lambda: w8a8_gemv_triton(x, None, q8, s8, None, x.dtype, config=cfg))
                        row["configs"][f"{bn}x{bk}"] = t * 1e3
                    except Exception as e:  # e.g. out of shared memory / registers
                        row["configs"][f"{bn}x{bk}"] = f"{type(e).__name__}"
                timed = {c: t for c, t in row["configs"].items() if isinstance(t, float)}
                best = min(timed, key=timed.get)
                row["fp8_gemv_default_us"] = do_bench(lambda: w8a8_gemv_triton(x, None, q8, s8, None, x.dtype)) * 1e3
                row["int8_gemv_default_us"] = do_bench(lambda: w8a8_gemv_triton(x, None, qi, si, None, x.dtype)) * 1e3
                gemv = f"{timed[best]:.1f} ({best}; default {row['fp8_gemv_default_us']:.1f})"
                int8 = f"{row['int8_gemv_default_us']:.1f}"
            else:
                gemv = int8 = "-"

            def scaled():
                xq, sx = act_quant_triton(x, torch.float8_e4m3fn)
                return w8a8_mm(xq, sx, q8, s8, None, x.dtype)

            xpad = torch.cat([x, x.new_zeros(max(0, 16 - m), k)]) if m < 16 else x
            try:
                row["fp8_scaled_mm_us"] = do_bench(scaled if m > 8 else lambda: _padded(xpad, q8, s8)) * 1e3
                sm = f"{row['fp8_scaled_mm_us']:.1f}"
            except Exception as e:
                sm = type(e).__name__
            record["results"].append(row)
            lines.append(f"| {name} | {m} | {bf16:.1f} | {gemv} | {int8} | {sm} |")
            print(lines[-1], flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    header = f"# W8A8 GEMV, {record['device']}\n\n`{record['command']}`\n\n"
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


def _padded(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Activation quant + _scaled_mm on rows padded to 16 (cuBLASLt's FP8 minimum)."""
    xq, sx = act_quant_triton(x, torch.float8_e4m3fn)
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
