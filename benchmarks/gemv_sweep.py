"""Which kernel each few-row linear of a model takes on this GPU: time the candidates, write the table.

    PYTHONPATH=. python benchmarks/gemv_sweep.py --models llama-3-8b --rows 1,2,4,8 \\
        --dtypes bfloat16,float8_e4m3fn,int8 --results benchmarks/results/h200/gemv_sweep

For every projection shape of the models (qkv, o, gate_up, down; the LM head in the model dtype only),
row count and weight dtype, the candidates are cuBLAS (8-bit: activation quant + torch._scaled_mm /
_int_mm), the plain GEMV (8-bit: the fused quantizing GEMV) and the tensor-core kernel (8-bit: after activation
quant) over a grid of tiles. Each is timed by benchmarks/graph_timer.py:
a CUDA graph of calls over a rotation of weight copies larger than the L2, as consecutive layers of a decode step
read them. The fastest goes into mini_infer/kernels/gemv_configs.json under this GPU's name (merged with
what the file holds for other GPUs); every timing goes to RESULTS.json and a summary to RESULTS.md.
"""

# ruff: noqa: B023  (every lambda is timed right where it is made)
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from graph_timer import rotation_us  # benchmarks/: the script's own folder

from mini_infer.kernels.act_quant import act_quant_ref, act_quant_triton
from mini_infer.kernels.gemv import GemvConfig, gemv_triton
from mini_infer.kernels.gemv_table import TABLE_FILE, dtype_key
from mini_infer.kernels.scaled_mm import w8a8_gemv_triton, w8a8_mm
from mini_infer.kernels.skinny_mm import SkinnyConfig, skinny_mm
from mini_infer.model_loader import load_hf_config, preset_path

ROTATION_BYTES = 512 << 20  # weight copies per shape: at least this much, ten times an H200's L2
# Tile grids, pruned to what can win a weight-bound product (~200 compiles in all).
GEMV_TILES = [GemvConfig(bn, bk, w, s) for bn in (2, 4, 8) for bk in (1024, 2048) for w in (4, 8) for s in (2, 3)]
SKINNY_TILES = [
    SkinnyConfig(bn, bk, w, s)
    for bn in (16, 32, 64, 128)
    for bk in (128, 256, 512)
    for w in (4, 8)
    for s in (3, 5)
    if bn * bk <= 32768 and (w == 4 or bn * bk >= 16384)
]
FUSED8_TILES = [(8, 512), (16, 256), (16, 512), (32, 256), (8, 1024)]


def model_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of a preset's decoder layer, and of its LM head."""
    path = preset_path(name)
    if path is None:
        raise SystemExit(f"unknown preset {name!r}")
    c = load_hf_config(path)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    return {
        "qkv": (q + 2 * kv, c.hidden_size),
        "o": (c.hidden_size, q),
        "gate_up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
        "lm_head": (c.vocab_size, c.hidden_size),
    }


def candidates(dtype: torch.dtype, rows: int, xs, ws, scales, smoke: bool):
    """(kernel, tile dict, fn(i)) for every candidate of one shape and row count."""
    eight_bit = dtype.itemsize == 1
    gemv_tiles = GEMV_TILES[:1] if smoke else GEMV_TILES
    skinny_tiles = [SkinnyConfig(16, 32, 4, 2)] if smoke else SKINNY_TILES
    fused_tiles = FUSED8_TILES[:1] if smoke else FUSED8_TILES
    x = xs
    if not eight_bit:
        yield "cublas", {}, lambda i: F.linear(x, ws[i])
        if rows <= 2:
            for t in gemv_tiles:
                yield "gemv", vars(t), lambda i, t=t: gemv_triton(x, ws[i], config=t)
        for t in skinny_tiles:
            yield "skinny", vars(t), lambda i, t=t: skinny_mm(x, ws[i], config=t)
        return

    def quantized_then(mm):
        def fn(i):
            xq, sx = act_quant_triton(x, dtype)
            return mm(xq, sx, i)

        return fn

    if torch.cuda.is_available():
        yield "cublas", {}, quantized_then(lambda xq, sx, i: w8a8_mm(xq, sx, ws[i], scales[i], None, x.dtype))
    if rows <= 8:
        for bn, bk in fused_tiles:
            cfg = (min(8, 1 << (rows - 1).bit_length()), bn, bk)
            yield (
                "gemv",
                {"block_n": bn, "block_k": bk},
                lambda i, cfg=cfg: w8a8_gemv_triton(x, None, ws[i], scales[i], None, x.dtype, config=cfg),
            )
    for t in skinny_tiles:
        yield (
            "skinny",
            vars(t),
            quantized_then(lambda xq, sx, i, t=t: skinny_mm(xq, ws[i], None, sx, scales[i], x.dtype, t)),
        )


def write(table: dict, table_path: Path, record: dict, lines: list[str], out: Path) -> None:
    table.setdefault("comment", "written by benchmarks/gemv_sweep.py; see mini_infer/kernels/gemv_table.py")
    table_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    header = f"# Few-row linears on {record['device']}\n\n`{record['command']}`\n\n"
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-3-8b", help="comma-separated presets")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--dtypes", default="bfloat16,float8_e4m3fn,int8")
    parser.add_argument("--results", default="benchmarks/results/gemv_sweep", help="path stem for .json/.md")
    parser.add_argument("--table", default=str(TABLE_FILE), help="the dispatch table to merge into")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new shapes after this")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one tile each (CPU, interpreter)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows_list = [int(r) for r in args.rows.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    shapes: dict[tuple[int, int], list[str]] = {}
    for model in args.models.split(","):
        for proj, nk in model_shapes(model).items():
            if args.smoke:
                nk = (max(16, nk[0] // 256), max(32, nk[1] // 256))
            shapes.setdefault(nk, []).append(f"{model}.{proj}")
    record = {"command": shlex.join(["python", *sys.argv]), "device": gpu, "results": []}
    table_path = Path(args.table)
    table = json.loads(table_path.read_text()) if table_path.exists() else {"configs": {}}
    chosen = table["configs"].setdefault(gpu, {})
    lines = ["| shape | dtype | rows | cuBLAS us | best gemv us | best skinny us | chosen | GB/s |", "|---" * 8 + "|"]
    start = time.monotonic()
    torch.manual_seed(0)
    for (n, k), names in shapes.items():
        for dtype in dtypes:
            if dtype.itemsize == 1 and any(name.endswith("lm_head") for name in names):
                continue  # the LM head stays in the model dtype under 8-bit schemes
            if time.monotonic() - start > args.budget_s:
                print(f"budget reached: skipping {names} {dtype_key(dtype)}", flush=True)
                continue
            weight_bytes = n * k * dtype.itemsize
            copies = 1 if args.smoke else max(2, math.ceil(ROTATION_BYTES / weight_bytes))
            base = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            if dtype.itemsize == 1:
                q, s = act_quant_ref(base, dtype)
                ws = [q.clone() for _ in range(copies)]
                scales = [s.clone() for _ in range(copies)]
            else:
                ws = [base.to(dtype) for _ in range(copies)]
                scales = None
            del base
            for rows in rows_list:
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16 if dtype.itemsize == 1 else dtype)
                timings = []
                for kernel, tile, fn in candidates(dtype, rows, x, ws, scales, args.smoke):
                    try:
                        us = rotation_us(fn, copies)
                    except Exception as error:  # a tile past the registers or shared memory
                        timings.append({"kernel": kernel, **tile, "error": f"{type(error).__name__}"})
                        continue
                    timings.append({"kernel": kernel, **tile, "us": us})
                timed = [t for t in timings if "us" in t]
                best = min(timed, key=lambda t: t["us"])
                entry = {key: v for key, v in best.items() if key != "us"}
                chosen.setdefault(dtype_key(dtype), {}).setdefault(str(rows), {})[f"{n}x{k}"] = entry

                def best_of(kernel: str) -> str:
                    ts = [t["us"] for t in timed if t["kernel"] == kernel]
                    return f"{min(ts):.1f}" if ts else "-"

                gbps = weight_bytes / (best["us"] * 1e-6) / 1e9
                label = "/".join(names)
                kernels = " | ".join(best_of(kernel) for kernel in ("cublas", "gemv", "skinny"))
                lines.append(
                    f"| {label} {n}x{k} | {dtype_key(dtype)} | {rows} | {kernels} | "
                    f"{best['kernel']} {best['us']:.1f} | {gbps:.0f} |"
                )
                print(lines[-1], flush=True)
                record["results"].append(
                    {"shape": [n, k], "names": names, "dtype": dtype_key(dtype), "rows": rows, "timings": timings}
                )
            del ws, scales
            if device == "cuda":
                torch.cuda.empty_cache()
            write(table, table_path, record, lines, Path(args.results))  # after every shape: a cut run keeps it
    print(f"wrote {table_path} and {args.results}.json / .md")


if __name__ == "__main__":
    main()
