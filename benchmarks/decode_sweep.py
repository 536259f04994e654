"""Decode attention at the shapes the engine really runs: short contexts in a wide block table.

The engine's block tables are as wide as max_model_len, the KV pool fills most of the GPU, and
contexts are far shorter than the table. This sweeps split policies and tile configs over such
shapes and prints % of the measured copy bandwidth (of the bytes the pool's dtype really moves).

    python benchmarks/decode_sweep.py [--kv-cache-dtype fp8] [--output-json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from graph_timer import graph_us

from mini_infer.bench.roofline import measure_hbm_bandwidth
from mini_infer.kernels.decode_attention import DecodeConfig, decode_attention_triton, decode_num_splits

PAGE, HEAD_DIM, DTYPE = 16, 128, torch.bfloat16


def case(
    batch: int,
    context: int,
    q_heads: int,
    kv_heads: int,
    width_tokens: int,
    pool_blocks: int,
    scatter: bool,
    configs: dict[str, DecodeConfig],
    gbps: float,
    kv_dtype: torch.dtype,
) -> dict:
    width = width_tokens // PAGE
    k_cache = torch.randn(pool_blocks, PAGE, kv_heads, HEAD_DIM, device="cuda", dtype=DTYPE).to(kv_dtype)
    v_cache = torch.randn_like(k_cache, dtype=DTYPE).to(kv_dtype)
    scales = {}
    if kv_dtype != DTYPE:  # an fp8 pool: per-tensor scales, as the engine passes them
        scales = dict(k_scale=torch.tensor([0.3], device="cuda"), v_scale=torch.tensor([0.7], device="cuda"))
    per_seq = min(width, triton.cdiv(context, PAGE))
    used = batch * per_seq
    ids = torch.randperm(pool_blocks, device="cuda")[:used] if scatter else torch.arange(used, device="cuda")
    tables = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    tables[:, :per_seq] = ids.view(batch, per_seq).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, q_heads, HEAD_DIM, device="cuda", dtype=DTYPE)
    moved = 2 * batch * context * kv_heads * HEAD_DIM * k_cache.element_size()
    ref = decode_attention_triton(q, k_cache, v_cache, seq_lens, tables, 0.088, DecodeConfig(num_splits=1), **scales)
    out = {}
    for name, cfg in configs.items():
        got = decode_attention_triton(q, k_cache, v_cache, seq_lens, tables, 0.088, cfg, **scales)
        err = (got.float() - ref.float()).abs().max().item()
        us = graph_us(
            lambda cfg=cfg: decode_attention_triton(q, k_cache, v_cache, seq_lens, tables, 0.088, cfg, **scales)
        )
        splits = decode_num_splits(batch, kv_heads, width * PAGE, q.device, cfg)
        out[name] = {
            "us": us,
            "pct_copy_bw": 100 * moved / (us * 1e-6) / 1e9 / gbps,
            "splits": splits,
            "max_abs_err": err,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output-json", default=None)
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto", help="the pool: bf16 or e4m3")
    ap.add_argument("--configs", default=None, help="comma-separated config names to time (default: all)")
    args = ap.parse_args()
    chosen = args.configs.split(",") if args.configs else None
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else DTYPE
    gbps = measure_hbm_bandwidth() / 1e9
    configs = {
        "default (no cap)": DecodeConfig(),
        "cap 512": DecodeConfig(max_split_tokens=512),
        "cap 256": DecodeConfig(max_split_tokens=256),
        "cap 1024": DecodeConfig(max_split_tokens=1024),
        "cap 512 bn32 w4 s4": DecodeConfig(block_n=32, num_stages=4, max_split_tokens=512),
        "bn64 s4": DecodeConfig(num_stages=4),
        "bn32 s4": DecodeConfig(block_n=32, num_stages=4),
        "programs/SM 8": DecodeConfig(programs_per_sm=8),
        "cap 256 bn32 w2 s3": DecodeConfig(block_n=32, num_warps=2, max_split_tokens=256),
        "cap 128 bn32": DecodeConfig(block_n=32, max_split_tokens=128),
        "min split 256 (old default)": DecodeConfig(min_split_tokens=256),
        "bn128": DecodeConfig(block_n=128),
        "bn128 w8": DecodeConfig(block_n=128, num_warps=8),
        "bn128 s4": DecodeConfig(block_n=128, num_stages=4),
        "bn64 w8": DecodeConfig(num_warps=8),
    }
    if chosen:
        configs = {name: configs[name] for name in chosen}
    # (label, batch, context, q heads, kv heads, table width in tokens, pool blocks, scattered pages)
    shapes = [
        ("qwen3-0.6b b256 ctx800 w4096 pool37k", 256, 800, 16, 8, 4096, 37_000, False),
        ("qwen3-0.6b b256 ctx800 w4096 pool37k scattered", 256, 800, 16, 8, 4096, 37_000, True),
        ("qwen3-0.6b b256 ctx800 w832 small pool", 256, 800, 16, 8, 832, 256 * 51, False),
        ("llama-3-8b b64 ctx512 w4096", 64, 512, 32, 8, 4096, 26_000, False),
        ("llama-3-8b b1 ctx512 w4096", 1, 512, 32, 8, 4096, 26_000, False),
        ("llama-3-8b b64 ctx4096 w4096 scattered", 64, 4096, 32, 8, 4096, 26_000, True),
        ("llama-3-8b b256 ctx200 w4096", 256, 200, 32, 8, 4096, 26_000, False),
        ("llama-3-8b b16 ctx2048 w8192", 16, 2112, 32, 8, 8192, 26_000, False),
        ("llama-3-8b b128 ctx2048 w8192", 128, 2112, 32, 8, 8192, 26_000, False),
    ]
    results = {"copy_gbps": gbps, "kv_cache_dtype": args.kv_cache_dtype, "cases": {}}
    for label, *shape in shapes:
        res = case(*shape, configs=configs, gbps=gbps, kv_dtype=kv_dtype)
        results["cases"][label] = res
        torch.cuda.empty_cache()
        print(f"\n== {label}")
        for name, r in res.items():
            print(
                f"  {name:28s} {r['us']:9.1f} us {r['pct_copy_bw']:6.1f}% splits {r['splits']} "
                f"err {r['max_abs_err']:.1e}"
            )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
