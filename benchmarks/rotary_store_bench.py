"""The attention prologue, unfused vs fused, replayed from CUDA graphs as the engine runs it.

Unfused is the sequence LlamaAttention ran before rotary_store_kv: for Qwen3 two copies of the strided
q/k views (reshape), the per-head q and k RMSNorms, then RoPE and the KV-cache store (existing Triton
kernels). Fused is rotary_store_kv_triton in place on the qkv buffer. Shapes: Qwen3-0.6B (16 q heads,
8 KV heads, head dim 128, q/k norm) and Llama-3-8B (32, 8, 128, no norm), bf16, at 1, 256 and 8192
tokens. Checks that both write bit-identical q, k and caches, then prints a table last.

    PYTHONPATH=. python benchmarks/rotary_store_bench.py [--output-json FILE]   (from the repo root)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import triton
import triton.testing

from mini_infer.kernels.kv_cache import store_kv_cache_triton
from mini_infer.kernels.rmsnorm import rms_norm_triton
from mini_infer.kernels.rotary import rotary_triton
from mini_infer.kernels.rotary_store import rotary_store_kv_ref, rotary_store_kv_triton

DTYPE, PAGE, HEAD_DIM, EPS, MAX_POS, DEVICE = torch.bfloat16, 16, 128, 1e-6, 40960, "cuda"
MODELS = {"qwen3-0.6b": (16, 8, True, 1e6), "llama-3-8b": (32, 8, False, 5e5)}  # Hq, Hk, qk norm, rope theta
TOKENS = (1, 256, 8192)


def graph_us(fn: Callable[[], object], calls: int = 20) -> float:
    """Microseconds per call replayed from a CUDA graph holding `calls` back-to-back calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=100, return_mode="median") * 1e3 / calls


def case(model: str, tokens: int) -> dict:
    num_q, num_k, norm, theta = MODELS[model]
    dev = DEVICE
    inv_freq = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, device=dev).float() / HEAD_DIM)
    freqs = torch.arange(MAX_POS, device=dev).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    qkv0 = torch.randn(tokens, (num_q + 2 * num_k) * HEAD_DIM, device=dev).to(DTYPE)
    positions = torch.randint(0, MAX_POS, (tokens,), device=dev)
    num_blocks = triton.cdiv(tokens, PAGE) + 8
    slots = torch.randperm(num_blocks * PAGE, device=dev)[:tokens]
    slots[3::7] = -1  # padded rows, as in a CUDA-graph batch
    weights = [(1 + 0.1 * torch.randn(HEAD_DIM, device=dev)).to(DTYPE) for _ in range(2)] if norm else [None, None]
    k_cache0 = torch.zeros(num_blocks, PAGE, num_k, HEAD_DIM, device=dev, dtype=DTYPE)

    def setup() -> tuple[torch.Tensor, ...]:
        qkv = qkv0.clone()
        q, k, v = qkv.split([num_q * HEAD_DIM, num_k * HEAD_DIM, num_k * HEAD_DIM], dim=-1)
        views = q.view(tokens, num_q, HEAD_DIM), k.view(tokens, num_k, HEAD_DIM), v.view(tokens, num_k, HEAD_DIM)
        return (*views, k_cache0.clone(), k_cache0.clone())

    def unfused(q, k, v, k_cache, v_cache):  # LlamaAttention.forward + PagedAttention's store, before the fusion
        if norm:
            q = rms_norm_triton(q.reshape(-1, HEAD_DIM), weights[0], EPS).view(-1, num_q, HEAD_DIM)
            k = rms_norm_triton(k.reshape(-1, HEAD_DIM), weights[1], EPS).view(-1, num_k, HEAD_DIM)
        rotary_triton(positions, q, k, cos_sin)
        store_kv_cache_triton(k, v, k_cache, v_cache, slots)
        return q, k

    def fused(q, k, v, k_cache, v_cache, op=rotary_store_kv_triton):
        op(positions, q, k, v, cos_sin, k_cache, v_cache, slots, *weights, EPS)
        return q, k

    results = {}
    for name, fn in (("unfused", unfused), ("fused", fused), ("ref", lambda *a: fused(*a, op=rotary_store_kv_ref))):
        q, k, v, k_cache, v_cache = setup()
        results[name] = (*fn(q, k, v, k_cache, v_cache), k_cache, v_cache)
    torch.cuda.synchronize()
    mismatches = {
        part: int((a != b).sum().item()) for part, a, b in zip(("q", "k", "k_cache", "v_cache"),
                                                                results["fused"], results["unfused"])
    }
    ref_err = max((a.float() - b.float()).abs().max().item() for a, b in zip(results["fused"], results["ref"]))

    args_unfused, args_fused = setup(), setup()
    times = {"unfused": graph_us(lambda: unfused(*args_unfused)), "fused": graph_us(lambda: fused(*args_fused))}
    # Bytes the fused kernel must move: q, k read and written in place, v read, k and v written to the cache.
    stored = int((slots >= 0).sum().item())
    moved = 2 * (tokens * (2 * (num_q + num_k) + num_k) + stored * 2 * num_k) * HEAD_DIM
    return {
        "model": model, "tokens": tokens, "qk_norm": norm, "unfused_us": times["unfused"], "fused_us": times["fused"],
        "speedup": times["unfused"] / times["fused"], "fused_GBps": moved / (times["fused"] * 1e-6) / 1e9,
        "bit_identical": all(n == 0 for n in mismatches.values()), "mismatches": mismatches,
        "max_abs_diff_vs_torch_ref": ref_err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [case(model, tokens) for model in MODELS for tokens in TOKENS]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "dtype": str(DTYPE), "rows": rows}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{report['device']}, CUDA-graph replay, bf16, head dim {HEAD_DIM}")
    print(f"{'model':12s} {'tokens':>6s} {'unfused us':>11s} {'fused us':>9s} {'speedup':>8s} {'fused GB/s':>11s} "
          f"{'bit-identical':>14s} {'|fused-ref|':>11s}")
    for r in rows:
        same = "yes" if r["bit_identical"] else "NO " + ",".join(f"{p}:{n}" for p, n in r["mismatches"].items() if n)
        print(f"{r['model']:12s} {r['tokens']:6d} {r['unfused_us']:11.2f} {r['fused_us']:9.2f} {r['speedup']:7.2f}x "
              f"{r['fused_GBps']:11.0f} {same:>14s} {r['max_abs_diff_vs_torch_ref']:11.2e}")


if __name__ == "__main__":
    main()
