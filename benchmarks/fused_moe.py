"""Fused MoE kernel on one GPU against a PyTorch loop over experts and torch.compile of that loop.

Qwen3-30B-A3B shapes (128 experts of 768, hidden 2048, top-8) and Mixtral-8x7B's (8 of 14336, hidden
4096, top-2), bf16, at decode sizes (1 to 256 tokens) and prefill sizes (1024 to 8192). Every
contender does the whole MoE MLP from router logits to output: top-k routing, the experts, the weighted
sum. The loop is `moe_topk_ref` + `fused_experts_ref` (transformers' algorithm: one gather, two matmuls
and an index_add per expert that got tokens); torch.compile compiles that same function. The Triton
path is timed eagerly and as a CUDA-graph replay (how the engine runs it at decode sizes; the loop
cannot be captured: it reads the routing back to the host). Also timed: the GEMV and grouped paths
each on their own at decode sizes, which shows where `gemv_max_tokens` should sit.

For each size: median ms (`triton.testing.do_bench`, L2 flushed), bytes of the experts the routing
touched (counted) plus activations over the time as a share of the measured copy bandwidth, FLOPs as a
share of the measured bf16 peak, speed-ups, and the error of each output against a float32 reference.
The issue's target, >= 5x the loop at 64 tokens, is checked from the measurement. Writes
benchmarks/results/<gpu>/fused_moe_<gpu>.json (or --out DIR) and prints a table last. Tile configs come
from mini_infer/kernels/fused_moe_configs.json: the record says whether they were tuned.

    PYTHONPATH=. python benchmarks/fused_moe.py [--out DIR] [--shapes qwen3-30b-a3b,mixtral-8x7b]
    PYTHONPATH=. python benchmarks/fused_moe.py --smoke   (CPU: every contender checked on a tiny shape, no timing)
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from mini_infer.kernels.fused_moe import fused_experts_gemv, fused_experts_grouped, fused_experts_ref
from mini_infer.kernels.fused_moe import fused_experts_triton as fused_triton
from mini_infer.kernels.moe_config import get_moe_config
from mini_infer.kernels.moe_routing import moe_topk_ref, moe_topk_triton

SHAPES = {  # experts, hidden, intermediate, top-k, renormalise
    "qwen3-30b-a3b": (128, 2048, 768, 8, True),
    "mixtral-8x7b": (8, 4096, 14336, 2, True),
}
DECODE_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
PREFILL_TOKENS = [1024, 4096, 8192]
TARGET_TOKENS, TARGET_SPEEDUP = 64, 5.0


def torch_moe(x, logits, w13, w2, top_k, renorm):
    weights, ids = moe_topk_ref(logits, top_k, renorm)
    return fused_experts_ref(x, w13, w2, weights.to(x.dtype), ids)


def triton_moe(x, logits, w13, w2, top_k, renorm):
    weights, ids = moe_topk_triton(logits, top_k, renorm)
    return fused_triton(x, w13, w2, weights.to(x.dtype), ids)


def path_moe(path: str) -> Callable:
    def run(x, logits, w13, w2, top_k, renorm):
        weights, ids = moe_topk_triton(logits, top_k, renorm)
        config = get_moe_config(w13.shape[0], w2.shape[1], w2.shape[2], w13.dtype, x.shape[0], x.device)
        if path == "gemv":
            return fused_experts_gemv(x, w13, w2, weights.to(x.dtype), ids, config.gemv)
        return fused_experts_grouped(x, w13, w2, weights.to(x.dtype), ids, config)

    return run


def compile_loop() -> Callable:
    """torch.compile of the loop. The loop's per-expert slices have a token count that changes with the
    routing and an expert index that is a Python int, so the compile is dynamic in shapes and the
    recompile limit is raised: with the default limit (8) dynamo falls back to eager after a few experts
    and the baseline would be the loop again."""
    torch._dynamo.config.recompile_limit = 4096
    torch._dynamo.config.accumulated_recompile_limit = 1 << 20
    return torch.compile(torch_moe, dynamic=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30)) if torch.isfinite(out).all() else float("nan")


def inputs(shape, tokens: int, dtype: torch.dtype, device: str, seed: int = 0):
    num_experts, hidden, inter, _, _ = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=device, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=device, generator=gen) / inter**0.5).to(dtype)
    x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
    logits = torch.randn(tokens, num_experts, device=device, generator=gen)
    return x, logits, w13, w2


def touched_bytes(shape, logits: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
    """(bytes: the touched experts' weights + x read + output written, FLOPs of the routed matmuls)."""
    num_experts, hidden, inter, top_k, renorm = shape
    _, ids = moe_topk_ref(logits, top_k, renorm)
    experts = int(torch.unique(ids).numel())
    elem = x.element_size()
    weights = experts * 3 * hidden * inter * elem
    return weights + 2 * x.numel() * elem, 2 * 3 * hidden * inter * ids.numel()


def smoke() -> None:
    """Every contender against the float32 reference on a tiny shape, under the interpreter."""
    shape = (8, 48, 40, 2, True)
    for tokens in (1, 3, 20):
        x, logits, w13, w2 = inputs(shape, tokens, torch.float32, "cpu")
        ref = torch_moe(x, logits, w13, w2, 2, True)
        for name, fn in (("triton", triton_moe), ("gemv", path_moe("gemv")), ("grouped", path_moe("grouped"))):
            err = rel_err(fn(x, logits, w13, w2, 2, True), ref)
            assert err < 1e-5, (name, tokens, err)
        compiled = compile_loop()
        assert rel_err(compiled(x, logits, w13, w2, 2, True), ref) < 1e-5
        touched_bytes(shape, logits, x)
    print("smoke: every contender matches the reference (no timing on CPU)")


def graph_replay(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(name: str, shape, tokens: int, dtype, compiled: Callable, ceilings: dict, ms: Callable) -> dict:
    """One size: every contender's median ms and error, the triton path's share of the ceilings."""
    _, _, _, top_k, renorm = shape
    x, logits, w13, w2 = inputs(shape, tokens, dtype, "cuda", seed=tokens)
    args = (x, logits, w13, w2, top_k, renorm)
    ref = torch_moe(x.float(), logits, w13.float(), w2.float(), top_k, renorm)
    contenders = {n: functools.partial(f, *args) for n, f in (("triton", triton_moe), ("torch_loop", torch_moe))}
    contenders["torch_compile"] = functools.partial(compiled, *args)
    if tokens in DECODE_TOKENS:
        contenders["triton_graph"] = graph_replay(functools.partial(triton_moe, *args))
        contenders["gemv_only"] = functools.partial(path_moe("gemv"), *args)
        contenders["grouped_only"] = functools.partial(path_moe("grouped"), *args)
    errors = {n: rel_err(f(), ref) for n, f in contenders.items() if n != "triton_graph"}
    times = {n: ms(f) for n, f in contenders.items()}
    nbytes, flops = touched_bytes(shape, logits, x)
    best = times.get("triton_graph", times["triton"])
    row = dict(shape=name, tokens=tokens, ms=times, rel_err_vs_fp32=errors, bytes=nbytes, flops=flops)
    row["pct_hbm"] = 100 * nbytes / (best * 1e-3) / 1e9 / ceilings["hbm_copy_GBps"]
    row["pct_bf16_peak"] = 100 * flops / (best * 1e-3) / 1e12 / ceilings["bf16_matmul_TFLOPs"]
    row["speedup_vs_loop"] = times["torch_loop"] / best
    row["speedup_vs_compile"] = times["torch_compile"] / best
    return row


def bench(args: argparse.Namespace) -> dict:
    from triton.testing import do_bench

    from mini_infer.bench.roofline import measure_hbm_bandwidth, measure_tensor_peak
    from mini_infer.kernels.moe_config import _load_file, config_key

    ms = lambda fn: do_bench(fn, warmup=10, rep=100, return_mode="median")
    gpu = torch.cuda.get_device_name()
    ceilings = {"hbm_copy_GBps": measure_hbm_bandwidth() / 1e9, "bf16_matmul_TFLOPs": measure_tensor_peak() / 1e12}
    record: dict = {"gpu": gpu, "torch": torch.__version__, "triton": __import__("triton").__version__}
    record.update(ceilings=ceilings, rows=[], errors={}, configs={})
    dtype = torch.bfloat16
    compiled = compile_loop()
    for name in args.shapes:
        shape = SHAPES[name]
        num_experts, hidden, inter, _, _ = shape
        key = config_key(num_experts, hidden, inter, dtype)
        record["configs"][name] = {"key": key, "tuned": key in _load_file()["configs"].get(gpu, {})}
        for tokens in DECODE_TOKENS + PREFILL_TOKENS:
            try:
                row = measure(name, shape, tokens, dtype, compiled, ceilings, ms)
                record["rows"].append(row)
                print(json.dumps(row), flush=True)
            except Exception as error:  # keep the other sizes
                record["errors"][f"{name}/{tokens}"] = traceback.format_exc(limit=3)
                print(f"[fused_moe] {name} {tokens}: {type(error).__name__}: {error}", flush=True)
    targets = [r for r in record["rows"] if r["tokens"] == TARGET_TOKENS]
    record["target"] = {
        f"{r['shape']}: >= {TARGET_SPEEDUP}x the PyTorch loop at {TARGET_TOKENS} tokens": r["speedup_vs_loop"]
        >= TARGET_SPEEDUP
        for r in targets
    }
    return record


def print_table(record: dict) -> None:
    print(f"\n{record['gpu']}, configs {record['configs']}")
    header = f"{'shape':<15}{'tokens':>7}{'triton':>9}{'graph':>9}{'loop':>9}{'compile':>9}{'x loop':>8}{'x comp':>8}"
    print(header + f"{'% HBM':>7}{'% peak':>8}{'err':>9}")
    for r in record["rows"]:
        t = r["ms"]
        graph = f"{t['triton_graph']:.3f}" if "triton_graph" in t else "-"
        print(
            f"{r['shape']:<15}{r['tokens']:>7}{t['triton']:>9.3f}{graph:>9}{t['torch_loop']:>9.3f}"
            f"{t['torch_compile']:>9.3f}{r['speedup_vs_loop']:>8.2f}{r['speedup_vs_compile']:>8.2f}"
            f"{r['pct_hbm']:>7.1f}{r['pct_bf16_peak']:>8.1f}{r['rel_err_vs_fp32']['triton']:>9.1e}"
        )
    for target, met in record["target"].items():
        print(f"target {target}: {'met' if met else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="(default: benchmarks/results/<gpu>)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--smoke", action="store_true", help="CPU: check every contender, time nothing")
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times kernels on a CUDA GPU (--smoke checks it on a CPU)")
    args.shapes = [s for s in args.shapes.split(",") if s]
    start = time.monotonic()
    record = bench(args)
    record["seconds"] = time.monotonic() - start
    gpu = re.sub(r"[^a-z0-9]+", "", record["gpu"].lower().replace("nvidia", ""))[:8] or "gpu"
    out = args.out or Path(__file__).parent / "results" / gpu
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fused_moe_{gpu}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print_table(record)
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
