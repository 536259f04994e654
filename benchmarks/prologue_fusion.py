"""Does folding the op before a few-row linear into its prologue pay? Each fusion against the unfused pair.

    PYTHONPATH=. python benchmarks/prologue_fusion.py --model llama-3-8b --rows 1,2,4,8 \\
        --output benchmarks/results/h200/prologue_fusion

Pairs of one decoder layer: add + RMSNorm -> qkv, add + RMSNorm -> gate_up, SiLU-and-mul -> down, for
the model dtype and the 8-bit weights (where the fused kernel also quantizes its input). Unfused: the
op's own Triton kernel, then the linear as the engine runs it now (kernels/gemv_table.py's choice);
fused: kernels/skinny_mm.py's skinny_mm_fused over a few tiles, the best kept. Timed in CUDA graphs over
weights larger than the L2 (benchmarks/graph_timer.py). Writes OUTPUT.json and OUTPUT.md.
"""

# ruff: noqa: B023  (every lambda is timed right where it is made)
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from mini_infer.kernels.act_quant import act_quant_ref
from mini_infer.kernels.activation import silu_and_mul_triton
from mini_infer.kernels.gemv import linear_triton
from mini_infer.kernels.gemv_table import dtype_key
from mini_infer.kernels.rmsnorm import fused_add_rms_norm_triton
from mini_infer.kernels.scaled_mm import w8a8_linear
from mini_infer.kernels.skinny_mm import SkinnyConfig, skinny_mm_fused
from mini_infer.model_loader import load_hf_config, preset_path

TILES = [
    SkinnyConfig(16, 256, 4, 3),
    SkinnyConfig(32, 256, 4, 3),
    SkinnyConfig(64, 128, 4, 3),
    SkinnyConfig(32, 512, 8, 3),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--dtypes", default="bfloat16,float8_e4m3fn,int8")
    parser.add_argument("--output", default="benchmarks/results/prologue_fusion", help="path stem")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prologue_fusion.py times GPU kernels: no CUDA device here")
    from graph_timer import graph_us

    c = load_hf_config(preset_path(args.model))
    hidden, inter = c.hidden_size, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    qkv_n = (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    pairs = {"add+norm->qkv": (qkv_n, hidden, "norm"), "add+norm->gate_up": (2 * inter, hidden, "norm"),
             "silu->down": (hidden, inter, "silu")}  # fmt: skip
    record = {"command": shlex.join(["python", *sys.argv]), "device": torch.cuda.get_device_name(), "results": []}
    lines = ["| pair | dtype | rows | unfused us | fused us (tile) | fused / unfused |", "|---" * 6 + "|"]
    torch.manual_seed(0)
    g = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    for name, (n, k, kind) in pairs.items():
        for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
            copies = max(2, math.ceil((512 << 20) / (n * k * dtype.itemsize)))
            base = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            if dtype.itemsize == 1:
                q, s = act_quant_ref(base, dtype)
                ws, scales = [q.clone() for _ in range(copies)], [s.clone() for _ in range(copies)]
            else:
                ws, scales = [base.to(dtype) for _ in range(copies)], [None] * copies
            del base

            def linear(x, i):
                if scales[i] is None:
                    return linear_triton(x, ws[i])
                return w8a8_linear(x, ws[i], scales[i], None)

            for rows in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(rows, 2 * k if kind == "silu" else k, device="cuda", dtype=torch.bfloat16)
                r = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                if kind == "norm":
                    unfused = lambda i: linear(fused_add_rms_norm_triton(x, r, g, 1e-5), i % copies)
                    fused = lambda i, t: skinny_mm_fused(
                        x, ws[i % copies], w_scale=scales[i % copies], residual=r, norm=(g, 1e-5), config=t
                    )
                else:
                    unfused = lambda i: linear(silu_and_mul_triton(x), i % copies)
                    fused = lambda i, t: skinny_mm_fused(
                        x, ws[i % copies], w_scale=scales[i % copies], silu=True, config=t
                    )
                calls = max(copies, 8)
                t_unfused = graph_us(_cycle(unfused, calls), calls)
                timed = {}
                for t in TILES:
                    try:
                        timed[t] = graph_us(_cycle(lambda i: fused(i, t), calls), calls)
                    except Exception as error:
                        print(f"{name} {t}: {type(error).__name__}", flush=True)
                best = min(timed, key=timed.get)
                row = {"pair": name, "dtype": dtype_key(dtype), "rows": rows, "unfused_us": t_unfused,
                       "fused_us": {str(vars(t)): us for t, us in timed.items()}}  # fmt: skip
                record["results"].append(row)
                tile = f"{best.block_n}x{best.block_k}/{best.num_warps}w/{best.num_stages}s"
                ratio = timed[best] / t_unfused
                cells = f"{t_unfused:.1f} | {timed[best]:.1f} ({tile}) | {ratio:.2f}"
                lines.append(f"| {name} | {dtype_key(dtype)} | {rows} | {cells} |")
                print(lines[-1], flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(
        f"# Prologue fusion, {record['device']}\n\n`{record['command']}`\n\n" + "\n".join(lines) + "\n"
    )


def _cycle(fn, calls: int):
    """fn(0), fn(1), ... across graph_us's back-to-back calls (graph_us calls without an index)."""
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(state["i"] % calls)

    return call


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_timer
    main()
