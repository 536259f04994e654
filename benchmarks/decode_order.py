"""Decode attention over the mixed context lengths of the throughput workload: rows as they come vs
longest context first (what the scheduler now sends).

The kernel's programs start in row order, heads fastest; with contexts of 100 to 2048 tokens a long row
that starts late keeps a few SMs busy after the rest are idle. CUDA-graph replay, KV blocks scattered
over a 37k-block pool as in the engine, % of the measured copy bandwidth.

    python benchmarks/decode_order.py [--output-json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
from graph_timer import graph_us

from mini_infer.bench.roofline import measure_hbm_bandwidth
from mini_infer.kernels.decode_attention import decode_attention_triton

PAGE, HEAD_DIM, KV_HEADS, Q_HEADS, POOL_BLOCKS, WIDTH_TOKENS = 16, 128, 8, 16, 37_000, 4096
CASES = (  # (batch, shortest context, longest context): the run's batches as they shrink
    (256, 100, 1024),
    (256, 100, 2048),
    (192, 300, 2048),
    (128, 500, 2048),
    (64, 800, 2048),
    (256, 800, 800),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    gbps = measure_hbm_bandwidth() / 1e9
    k_cache = torch.randn(POOL_BLOCKS, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"copy {gbps:.0f} GB/s")
    print(f"{'batch':>6} {'contexts':>10} {'as-is us':>9} {'%bw':>5} {'sorted us':>10} {'%bw':>5}")
    for batch, shortest, longest in CASES:
        lens = torch.randint(shortest, longest + 1, (batch,), generator=gen)
        perm = torch.randperm(POOL_BLOCKS, generator=gen)
        tables = torch.zeros(batch, WIDTH_TOKENS // PAGE, dtype=torch.int32)
        used = 0
        for i, n in enumerate(lens.tolist()):
            blocks = -(-n // PAGE)
            tables[i, :blocks] = perm[used : used + blocks]
            used += blocks
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        moved = 2 * int(lens.sum()) * KV_HEADS * HEAD_DIM * 2
        row = {"batch": batch, "contexts": [shortest, longest], "bytes": moved}
        outputs = {}
        for order, index in (("as_is", torch.arange(batch)), ("sorted", torch.argsort(lens, descending=True))):
            rows_q, seq_lens, block_tables = q[index.cuda()], lens[index].int().cuda(), tables[index].cuda()
            us = graph_us(
                lambda q=rows_q, s=seq_lens, t=block_tables: decode_attention_triton(q, k_cache, v_cache, s, t, 0.088)
            )
            outputs[order] = decode_attention_triton(rows_q, k_cache, v_cache, seq_lens, block_tables, 0.088)
            row[order] = {"us": us, "pct_copy_bw": 100 * moved / (us * 1e-6) / 1e9 / gbps}
        inverse = torch.argsort(torch.argsort(lens, descending=True)).cuda()
        assert torch.equal(outputs["sorted"][inverse], outputs["as_is"]), "row order changed a row's output"
        rows.append(row)
        print(
            f"{batch:>6} {f'{shortest}-{longest}':>10} {row['as_is']['us']:9.1f} {row['as_is']['pct_copy_bw']:5.0f}"
            f" {row['sorted']['us']:10.1f} {row['sorted']['pct_copy_bw']:5.0f}"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": gbps, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
