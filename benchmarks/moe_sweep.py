"""Tile sweep of the fused MoE kernel: writes the per-(E, H, N, dtype) configs it reads, for this GPU.

For each shape (the MoE presets' experts, hidden and intermediate sizes) and each token bucket, every
candidate tile config of the two grouped GEMMs (gate_up with SiLU-and-mul, down with the routing weight)
is timed on uniformly random routing (`triton.testing.do_bench`, median, L2 flushed), and the fastest
kept. The GEMV path's tile is swept at batch 1, then `gemv_max_tokens` is the largest token count up to
which the best GEMV beats the best grouped GEMMs at every size. The result replaces this GPU's entry for
the shape in mini_infer/kernels/fused_moe_configs.json, marked tuned and stamped with the versions and
arguments of the run; other entries stay as they are.

    PYTHONPATH=. python benchmarks/moe_sweep.py [--presets qwen3-30b-a3b,mixtral-8x7b] [--budget-s 1800]
    PYTHONPATH=. python benchmarks/moe_sweep.py --smoke --out /tmp/configs.json   (CPU: the plumbing only)

--smoke runs a tiny shape with two candidates per GEMM under Triton's interpreter and writes to --out
(never the shipped file): its times measure the interpreter, not a GPU, and its entry says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mini_infer.kernels.fused_moe import fused_experts_gemv, fused_experts_grouped, fused_experts_ref
from mini_infer.kernels.moe_config import (
    CONFIG_FILE,
    FusedMoeConfig,
    MoeGemmConfig,
    MoeGemvConfig,
    config_key,
    parse_entry,
)
from mini_infer.kernels.moe_routing import moe_topk_ref

BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
GEMV_SEARCH = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]


def gemm_candidates(num_tokens: int) -> list[MoeGemmConfig]:
    """Tile shapes worth timing at this many tokens: row tiles no larger than the pairs per expert call for,
    L2 swizzle groups only where there are many row tiles, warps that fit the tile, operands that fit
    shared memory."""
    out = []
    rows = [bm for bm in (16, 32, 64, 128) if bm == 16 or bm <= 4 * num_tokens]
    groups = (1, 8) if num_tokens >= 256 else (1,)
    for bm, bn, bk, gm, warps, stages in itertools.product(
        rows, (32, 64, 128, 256), (64, 128, 256), groups, (4, 8), (2, 3, 4)
    ):  # noqa: E501
        if (bm * bn >= 128 * 128) != (warps == 8):
            continue
        if bk * (bm + 2 * bn) * 2 * stages > 200 * 1024:  # bf16 operand tiles of the pipeline
            continue
        out.append(MoeGemmConfig(bm, bn, bk, gm, warps, stages))
    return out


def gemv_candidates() -> list[MoeGemvConfig]:
    return [
        MoeGemvConfig(bn, bk, warps, stages)
        for bn, bk, warps, stages in itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8), (2, 3, 4))
    ]


class Timer:
    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.smoke:  # the interpreter: one run, to exercise the code
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25, return_mode="median")


def problem(num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=device, generator=gen).to(dtype) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, device=device, generator=gen).to(dtype) / inter**0.5
    x = torch.randn(num_tokens, hidden, device=device, generator=gen).to(dtype)
    logits = torch.randn(num_tokens, num_experts, device=device, generator=gen)
    weights, ids = moe_topk_ref(logits, top_k, True)
    return x, w13, w2, weights.to(dtype), ids


def grouped(p: tuple, config: FusedMoeConfig) -> Callable[[], torch.Tensor]:
    return lambda: fused_experts_grouped(*p, config)


def gemv(p: tuple, config: MoeGemvConfig) -> Callable[[], torch.Tensor]:
    return lambda: fused_experts_gemv(*p, config)


def sweep_shape(args: argparse.Namespace, shape: tuple[int, int, int, int], timer: Timer, deadline: float) -> dict:
    num_experts, hidden, inter, top_k = shape
    dtype, device = getattr(torch, args.dtype), args.device
    base = FusedMoeConfig(0, MoeGemvConfig(), MoeGemmConfig(), MoeGemmConfig(), tuned=False)
    buckets: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    grouped_best_ms: dict[int, float] = {}
    for tokens in args.buckets:
        p = problem(num_experts, hidden, inter, top_k, tokens, dtype, device)
        ref = fused_experts_ref(*p) if args.smoke else None
        best: dict[str, tuple[float, MoeGemmConfig]] = {}
        for which in ("gate_up", "down"):
            candidates = args.candidates(tokens)
            for cfg in candidates:
                if time.monotonic() > deadline:
                    break
                # time one GEMM's config with the other fixed: the two are independent launches
                config = dataclasses.replace(base, **{which: cfg})
                try:
                    out = grouped(p, config)()
                    ms = timer(grouped(p, config))
                except Exception as error:  # e.g. out of shared memory on this GPU
                    print(f"[sweep] {which} {cfg}: {type(error).__name__}", flush=True)
                    continue
                if ref is not None:
                    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
                if which not in best or ms < best[which][0]:
                    best[which] = (ms, cfg)
        if len(best) < 2:
            print(f"[sweep] {tokens} tokens: out of time or no config ran; bucket left out", flush=True)
            continue
        chosen = FusedMoeConfig(0, MoeGemvConfig(), best["gate_up"][1], best["down"][1], tuned=False)
        grouped_best_ms[tokens] = timer(grouped(p, chosen))
        buckets[str(tokens)] = {w: best[w][1].__dict__ for w in ("gate_up", "down")}
        timings[str(tokens)] = {"gate_up_alone_ms": best["gate_up"][0], "down_alone_ms": best["down"][0]}
        timings[str(tokens)]["grouped_ms"] = grouped_best_ms[tokens]
        print(f"[sweep] E={num_experts} {tokens} tokens: {buckets[str(tokens)]}", flush=True)
    # the GEMV tile at batch 1, then how far the GEMV path beats the grouped one
    p = problem(num_experts, hidden, inter, top_k, 1, dtype, device)
    gemv_best = min(((timer(gemv(p, c)), c) for c in args.gemv_candidates()), key=lambda t: t[0])[1]
    gemv_max_tokens = 0
    entry_so_far = {"gemv_max_tokens": 0, "gemv": gemv_best.__dict__, "buckets": buckets}
    for tokens in GEMV_SEARCH if not args.smoke else [1, 2]:
        p = problem(num_experts, hidden, inter, top_k, tokens, dtype, device)
        gemv_ms = timer(gemv(p, gemv_best))
        grouped_ms = timer(grouped(p, parse_entry(entry_so_far, tokens)))
        timings.setdefault("gemv_vs_grouped", {})[str(tokens)] = {"gemv_ms": gemv_ms, "grouped_ms": grouped_ms}
        if gemv_ms >= grouped_ms:
            break
        gemv_max_tokens = tokens
    return {
        "tuned": True,
        "gemv_max_tokens": gemv_max_tokens,
        "gemv": gemv_best.__dict__,
        "buckets": buckets,
        "sweep": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "top_k": top_k,
            "timings_ms": timings,
            "smoke": bool(args.smoke),
        },
    }


def preset_shape(name: str) -> tuple[int, int, int, int]:
    from mini_infer.model_loader import load_hf_config, preset_path

    path = preset_path(name)
    if path is None:
        raise SystemExit(f"no preset {name!r}")
    config = load_hf_config(path)
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return experts, config.hidden_size, inter, config.num_experts_per_tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="qwen3-30b-a3b,mixtral-8x7b", help="comma list of MoE presets")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--buckets", default=",".join(map(str, BUCKETS)), help="token counts to tune for")
    parser.add_argument("--budget-s", type=float, default=3600.0, help="stop sweeping after this long")
    parser.add_argument("--out", type=Path, default=None, help=f"config file to update (default: {CONFIG_FILE})")
    parser.add_argument("--smoke", action="store_true", help="CPU: a tiny shape under the interpreter, into --out")
    args = parser.parse_args()
    args.buckets = [int(b) for b in args.buckets.split(",") if b]
    if args.smoke:
        if args.out is None:
            raise SystemExit("--smoke writes only to an explicit --out, never the shipped config file")
        args.device, args.dtype, args.buckets = "cpu", "float32", [1, 20]
        args.candidates = lambda tokens: [MoeGemmConfig(16, 32, 32), MoeGemmConfig(16, 16, 32, group_m=2)]
        args.gemv_candidates = lambda: [MoeGemvConfig(16, 32), MoeGemvConfig(8, 64)]
        shapes, device_name = [(8, 48, 40, 2)], "smoke (Triton interpreter, not a measurement)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the sweep times kernels on a CUDA GPU (--smoke checks the script on a CPU)")
        args.device, args.candidates, args.gemv_candidates = "cuda", gemm_candidates, gemv_candidates
        shapes, device_name = [preset_shape(p) for p in args.presets.split(",") if p], torch.cuda.get_device_name()
    out = args.out or CONFIG_FILE
    data = json.loads((out if out.exists() else CONFIG_FILE).read_text())
    deadline = time.monotonic() + args.budget_s
    for shape in shapes:
        entry = sweep_shape(args, shape, Timer(args.smoke), deadline)
        key = config_key(shape[0], shape[1], shape[2], getattr(torch, args.dtype))
        data["configs"].setdefault(device_name, {})[key] = entry
        out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"[sweep] wrote {device_name} / {key} to {out}", flush=True)


if __name__ == "__main__":
    main()
