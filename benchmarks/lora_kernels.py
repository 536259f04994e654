"""LoRA shrink + expand per projection on this GPU: time launch configs, write the best to the kernels' table.

    PYTHONPATH=. python benchmarks/lora_kernels.py --model qwen3-8b --budget-s 420 \\
        --output-json benchmarks/results/h200/lora_kernels_qwen3-8b.json

For each projection of the model's decoder layer (fused qkv, o, fused gate_up, down) and decode-sized
token count T (--tokens), the pair shrink + expand (kernels/lora.py) is timed with 1, 4 and 16 adapters
(--adapters; token t uses adapter t mod N, max_loras = the largest N, rank --rank), against the base GEMM
of the projection (F.linear, cuBLAS). Timing is benchmarks/graph_timer.py's: a CUDA graph of calls over a
rotation of weight copies larger than the L2, as consecutive layers read them. Configs are searched in
two stages: the shrink's (block_k, split_k, tile programs, warps) with the default expand, then the
expand's (block_n, column blocks per program, tile programs, warps) with the best shrink. A config must
serve every adapter mix of one T (a CUDA graph is captured per T), so the one with the least total time
over the adapter counts wins. The winners go into mini_infer/kernels/lora_configs.json under this GPU's
name (merged with what the file holds; o and down share the expand's shape, N x S*R, so its entry is
the one measured last), every timing and each winner's error against the reference into --output-json,
a table to stdout and to the .md beside it. New (projection, T) groups stop starting after --budget-s;
what finished is written.

`--smoke` runs the same code on the CPU (Triton's interpreter) with tiny shapes, T = 16, 1 and 2 adapters of
rank 4, and one or two configs (a test runs it).
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

import numpy as np
import torch
import torch.nn.functional as F
from graph_timer import rotation_us  # benchmarks/: the script's own folder

from mini_infer.kernels.lora import (
    CONFIG_FILE,
    build_lora_tiles,
    lora_block_m,
    lora_expand_ref,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_triton,
    max_lora_tiles,
)
from mini_infer.model_loader import load_hf_config, preset_path

ROTATION_BYTES = 256 << 20  # weight copies per shape: at least this much, five times an H200's L2


def projections(model: str) -> dict[str, tuple[int, list[int]]]:
    """name -> (input features, output slice widths) of a preset's decoder layer."""
    path = preset_path(model)
    if path is None:
        raise SystemExit(f"unknown preset {model!r}")
    c = load_hf_config(path)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    return {
        "qkv": (c.hidden_size, [q, kv, kv]),
        "o": (q, [c.hidden_size]),
        "gate_up": (c.hidden_size, [c.intermediate_size, c.intermediate_size]),
        "down": (c.intermediate_size, [c.hidden_size]),
    }


def shrink_candidates(num_tokens: int, k: int, capacity: int, smoke: bool) -> list[dict]:
    if smoke:
        return [{}]
    out = []
    for block_k in (64, 128, 256):
        for split_k in (1, 2, 4, 8, 16, 32):
            if split_k * block_k > k:
                continue
            for tile_programs in sorted({capacity, min(capacity, 16)}):
                for num_warps in (4, 8) if block_k == 256 else (4,):
                    out.append(dict(block_k=block_k, split_k=split_k, tile_programs=tile_programs, num_warps=num_warps))
    return out


def expand_candidates(capacity: int, smoke: bool) -> list[dict]:
    if smoke:
        return [{}, {"block_n": 16, "col_blocks": 2, "tile_programs": 1}]
    out = []
    for block_n in (64, 128, 256):
        for col_blocks in (1, 2, 4):
            for tile_programs in sorted({capacity, min(capacity, 16)}):
                for num_warps in (4, 8):
                    out.append(
                        dict(block_n=block_n, col_blocks=col_blocks, tile_programs=tile_programs, num_warps=num_warps)
                    )
    return out


class Case:
    """One projection at one token count and adapter count: rotated weights, inputs, the tile list."""

    def __init__(self, k: int, widths: list[int], rank: int, num_tokens: int, num_adapters: int, max_loras: int):
        device, dtype = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
        self.slices = tuple(int(v) for v in np.cumsum([0, *widths]))
        n, sr = self.slices[-1], len(widths) * rank
        lora_bytes = max_loras * (sr * k + n * rank) * dtype.itemsize
        self.copies = 1 if device == "cpu" else max(2, math.ceil(ROTATION_BYTES / lora_bytes))
        self.lora_a = [torch.randn(max_loras, sr, k, device=device, dtype=dtype) * 0.02 for _ in range(self.copies)]
        self.lora_b = [torch.randn(max_loras, n, rank, device=device, dtype=dtype) * 0.02 for _ in range(self.copies)]
        self.x = torch.randn(num_tokens, k, device=device, dtype=dtype)
        self.y = torch.zeros(num_tokens, n, device=device, dtype=dtype)
        self.block_m = lora_block_m(num_tokens)
        slots = np.arange(num_tokens) % num_adapters
        sorted_tokens, tiles = build_lora_tiles(slots, max_loras, self.block_m)
        count = np.array([(tiles[:, 0] >= 0).sum()], dtype=np.int32)
        self.index = [torch.from_numpy(a).to(device) for a in (sorted_tokens, tiles, count)]
        self.token_slots = torch.from_numpy(slots.astype(np.int32)).to(device)
        self.capacity = tiles.shape[0]

    def run(self, i: int, shrink: dict, expand: dict) -> torch.Tensor:
        sorted_tokens, tiles, count = self.index
        s = lora_shrink_triton(self.x, self.lora_a[i], sorted_tokens, tiles, count, self.block_m, **shrink)
        return lora_expand_triton(
            self.y, s, self.lora_b[i], sorted_tokens, tiles, count, self.block_m, self.slices, **expand
        )

    def max_error(self, shrink: dict, expand: dict) -> float:
        """Largest |kernel - reference| of the delta, over the first weight copy (a GPU check of a config)."""
        sorted_tokens, tiles, count = self.index
        s = lora_shrink_triton(self.x, self.lora_a[0], sorted_tokens, tiles, count, self.block_m, **shrink)
        y = torch.zeros_like(self.y)
        lora_expand_triton(y, s, self.lora_b[0], sorted_tokens, tiles, count, self.block_m, self.slices, **expand)
        s_ref = lora_shrink_ref(self.x, self.lora_a[0], self.token_slots)
        y_ref = lora_expand_ref(torch.zeros_like(self.y), s_ref, self.lora_b[0], self.token_slots, list(self.slices))
        return (y.float() - y_ref.float()).abs().max().item()

    def time(self, shrink: dict, expand: dict) -> float | str:
        try:
            return rotation_us(lambda i: self.run(i, shrink, expand), self.copies)
        except Exception as error:  # a config past the registers or shared memory
            return f"{type(error).__name__}: {str(error)[:80]}"


def base_gemm_us(k: int, n: int, num_tokens: int, smoke: bool) -> float:
    device, dtype = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16
    copies = 1 if smoke else max(2, math.ceil(ROTATION_BYTES / (n * k * dtype.itemsize)))
    ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(num_tokens, k, device=device, dtype=dtype)
    us = rotation_us(lambda i: F.linear(x, ws[i]), copies)
    return us


def best(cases: list[Case], candidates: list[dict], fixed: dict, stage: str) -> tuple[dict, list[dict]]:
    """The candidate with the least total time over the cases (adapter counts), and every timing."""
    timings = []
    for cand in candidates:
        shrink, expand = (cand, fixed) if stage == "shrink" else (fixed, cand)
        us = [case.time(shrink, expand) for case in cases]
        timings.append({"stage": stage, **cand, "us": us})
    ok = [t for t in timings if all(isinstance(u, float) for u in t["us"])]
    chosen = min(ok, key=lambda t: sum(t["us"]))
    return {k: v for k, v in chosen.items() if k not in ("stage", "us")}, timings


def write(table: dict, table_path: Path, record: dict, lines: list[str], out: Path) -> None:
    table.setdefault("comment", "written by benchmarks/lora_kernels.py; see mini_infer/kernels/lora.py")
    table_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    header = f"# LoRA shrink + expand on {record['device']}\n\n`{record['command']}`\n\n"
    out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen3-8b", help="a preset")
    parser.add_argument("--tokens", default="128,64,256,16", help="token counts, in the order to measure them")
    parser.add_argument("--adapters", default="1,4,16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--table", default=str(CONFIG_FILE), help="the config table to merge into")
    parser.add_argument("--output-json", required=True)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new (projection, T) after this")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one config each (CPU, interpreter)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    token_counts = [int(t) for t in args.tokens.split(",")]
    adapter_counts = [int(a) for a in args.adapters.split(",")]
    projs = projections(args.model)
    if args.smoke:
        token_counts, adapter_counts, args.rank = [16], [1, 2], 4
        projs = {name: (max(16, k // 256), [max(8, w // 256) for w in ws]) for name, (k, ws) in projs.items()}
    max_loras = max(adapter_counts)
    record = {"command": shlex.join(["python", *sys.argv]), "device": gpu, "rank": args.rank, "results": []}
    table_path = Path(args.table)
    table = json.loads(table_path.read_text()) if table_path.exists() else {"configs": {}}
    chosen = table["configs"].setdefault(gpu, {}).setdefault("bfloat16", {})
    lines = [
        "| proj | T | adapters | base GEMM us | default LoRA us | tuned LoRA us | tuned / base |",
        "|---" * 7 + "|",
    ]
    torch.manual_seed(0)
    for num_tokens in token_counts:
        for name, (k, widths) in projs.items():
            if time.monotonic() - start > args.budget_s:
                print(f"budget reached: skipping {name} T={num_tokens}", flush=True)
                continue
            n, sr = sum(widths), len(widths) * args.rank
            base_us = base_gemm_us(k, n, num_tokens, args.smoke)
            cases = [Case(k, widths, args.rank, num_tokens, a, max_loras) for a in adapter_counts]
            capacity = max_lora_tiles(num_tokens, max_loras)
            default_us = [case.time({}, {}) for case in cases]
            shrink, timings = best(cases, shrink_candidates(num_tokens, k, capacity, args.smoke), {}, "shrink")
            expand, more = best(cases, expand_candidates(capacity, args.smoke), shrink, "expand")
            tuned_us = [case.time(shrink, expand) for case in cases]
            errors = [case.max_error(shrink, expand) for case in cases]
            if max(errors) > 1e-2:  # the delta is ~1e-2 itself: a wrong config, not rounding
                print(f"WARNING: {name} T={num_tokens}: tuned config off the reference by {max(errors):.3g}")
            chosen.setdefault("shrink", {}).setdefault(str(num_tokens), {})[f"{sr}x{k}"] = shrink
            chosen.setdefault("expand", {}).setdefault(str(num_tokens), {})[f"{n}x{sr}"] = expand
            for adapters, d, t in zip(adapter_counts, default_us, tuned_us):
                lines.append(
                    f"| {name} {n}x{k} | {num_tokens} | {adapters} | {base_us:.1f} | {d:.1f} | {t:.1f} | "
                    f"{t / base_us:.2f} |"
                )
                print(lines[-1], flush=True)
            record["results"].append(
                {
                    "proj": name,
                    "n": n,
                    "k": k,
                    "slices": widths,
                    "tokens": num_tokens,
                    "adapters": adapter_counts,
                    "base_gemm_us": base_us,
                    "default_us": default_us,
                    "tuned_us": tuned_us,
                    "max_abs_error_vs_reference": errors,
                    "shrink": shrink,
                    "expand": expand,
                    "timings": timings + more,
                }
            )
            del cases
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            record["elapsed_s"] = time.monotonic() - start
            write(table, table_path, record, lines, Path(args.output_json))  # after every group: a cut run keeps it
    for num_tokens in token_counts:  # per layer: the four projections together
        rows = [r for r in record["results"] if r["tokens"] == num_tokens]
        if len(rows) != len(projs):
            continue
        for j, adapters in enumerate(adapter_counts):
            base = sum(r["base_gemm_us"] for r in rows)
            default, tuned = (sum(r[key][j] for r in rows) for key in ("default_us", "tuned_us"))
            lines.append(
                f"| layer (4 projections) | {num_tokens} | {adapters} | {base:.1f} | {default:.1f} | {tuned:.1f} | "
                f"{tuned / base:.2f} |"
            )
            print(lines[-1], flush=True)
    record["elapsed_s"] = time.monotonic() - start
    write(table, table_path, record, lines, Path(args.output_json))
    print(f"wrote {table_path} and {args.output_json} ({record['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
