"""Why Qwen3-0.6B's decode GEMMs cost 3-4x their bytes: the per-kernel floor inside a CUDA graph.

At decode sizes (M = 1..256 rows) Qwen3-0.6B's projections hold 4-12 MB of weights, 1.4-4 us at HBM
speed, yet each takes about 6 us. This script measures, in CUDA graphs as the engine replays them:

1. bandwidth: a read-only reduction, beside the device copy the roofline measures;
2. the floor: a chain of kernels that each move 4 KB, i.e. what any kernel costs in a graph;
3. cuBLAS (F.linear) per projection of Qwen3-0.6B and Llama-3-8B, 28 (4) layers with distinct weights
   so nothing stays in L2, against max(bytes / bandwidth, FLOPs / peak);
4. a Triton candidate, a swap-AB `tl.dot` GEMM with optional deterministic split-K (the last split of
   a tile to arrive adds the partials in split order), swept over tiles, K split and pipeline depth on
   Qwen3-0.6B's shapes; the best configuration per shape and row count against cuBLAS.

    python benchmarks/gemm_floor.py [--output-json FILE] [--budget-s 300]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from graph_timer import graph_us

from mini_infer.bench.roofline import measure_hardware

QWEN = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}  # (N, K)
LLAMA = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 16, 64, 128, 192, 256)
SWEEP_ROWS = {16: (16,), 64: (32, 64), 128: (64, 128), 256: (64, 128)}  # rows: BLOCK_M candidates


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    ws_ptr,
    count_ptr,
    M,
    N,
    K,
    x_stride,
    w_stride,
    y_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] w[n, k]: the weight rows are the MMA's M side, so few rows still fill it."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_len = K // SPLIT_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = split * k_len + tl.arange(0, BLOCK_K)
    n_mask, m_mask = offs_n < N, offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * w_stride + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * x_stride + offs_k[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(0, k_len, BLOCK_K):
        acc = tl.dot(
            tl.load(w_ptrs, mask=n_mask[:, None], other=0.0), tl.load(x_ptrs, mask=m_mask[None, :], other=0.0), acc
        )
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y_ptrs = y_ptr + offs_m[None, :] * y_stride + offs_n[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        partial = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.store(partial + split * M * N, acc, mask=out_mask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(partial + s * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + tile, 0)


def triton_gemm(x, w, counters, block_m, block_n, block_k, split_k, stages):
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws = torch.empty(split_k * m * n if split_k > 1 else 1, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _gemm_kernel[grid](
        x,
        w,
        y,
        ws,
        counters,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        num_warps=8 if block_m * block_n >= 8192 else 4,
        num_stages=stages,
    )
    return y


def over_layers(linear, x, weights):
    """One call per layer's weight, as a decode step makes them."""
    return lambda: [linear(x, w) for w in weights]


def read_gbps() -> float:
    """A read-only reduction over 4 GiB; the copy bandwidth is the roofline's own (`roofline_hbm_gbps`)."""
    x = torch.randn(2**31, dtype=torch.bfloat16, device="cuda")
    return x.nbytes / (graph_us(lambda: x.sum(), calls=1, reps=10) * 1e-6) / 1e9


def kernel_floor_us(chain: int = 100) -> float:
    """A chain of dependent 4 KB copies: what one kernel costs in a graph whatever it does."""
    a = torch.zeros(2048, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    return graph_us(lambda: [b.copy_(a) if i % 2 else a.copy_(b) for i in range(chain)], calls=1) / chain


def cublas_table(shapes, layers, peak_bw, peak_flops) -> list[dict]:
    weights = {
        k: [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        for k, (n, kk) in shapes.items()
    }
    rows = []
    for m in ROWS:
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = graph_us(over_layers(F.linear, x, weights[name]), calls=1) / layers
            ideal = max(2 * n * k / peak_bw, 2 * m * n * k / peak_flops) * 1e6
            rows.append({"rows": m, "proj": name, "cublas_us": us, "ideal_us": ideal})
    return rows


def triton_sweep(budget_s: float) -> list[dict]:
    start = time.time()
    counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
    weights = {
        k: [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(28)]
        for k, (n, kk) in QWEN.items()
    }
    out = []
    for m, block_ms in SWEEP_ROWS.items():
        for name, (_, k) in QWEN.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weights[name][0].float())
            cublas = graph_us(over_layers(F.linear, x, weights[name]), calls=1) / 28
            tried = []
            for bm, bn, bk, stages, split in itertools.product(block_ms, (16, 32, 64), (128, 256), (3, 5), (1, 2)):
                if k % (bk * split) or time.time() - start > budget_s:
                    continue
                gemm = functools.partial(
                    triton_gemm, counters=counters, block_m=bm, block_n=bn, block_k=bk, split_k=split, stages=stages
                )
                try:
                    y = gemm(x, weights[name][0])
                except triton.runtime.errors.OutOfResources:  # tiles and stages beyond shared memory
                    continue
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                same = torch.equal(y, gemm(x, weights[name][0]))
                us = graph_us(over_layers(gemm, x, weights[name]), calls=1) / 28
                tried.append(
                    {
                        "us": us,
                        "block_m": bm,
                        "block_n": bn,
                        "block_k": bk,
                        "split_k": split,
                        "stages": stages,
                        "rel_err": err,
                        "deterministic": same,
                    }
                )
            tried.sort(key=lambda r: r["us"])
            out.append({"rows": m, "proj": name, "cublas_us": cublas, "configs_tried": len(tried), "best": tried[:3]})
            if tried:
                b = tried[0]
                print(
                    f"triton M={m:3d} {name:8s} cuBLAS {cublas:5.2f} us, best Triton {b['us']:5.2f} us "
                    f"(BM {b['block_m']} BN {b['block_n']} BK {b['block_k']} split {b['split_k']} "
                    f"stages {b['stages']}) of {len(tried)}",
                    flush=True,
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--budget-s", type=float, default=300, help="time for the Triton sweep")
    args = parser.parse_args()
    hw = measure_hardware()
    record = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "roofline_hbm_gbps": hw.hbm_bytes_per_s / 1e9,
        "roofline_tflops": hw.peak_flops / 1e12,
        "read_gbps": read_gbps(),
        "kernel_floor_us": kernel_floor_us(),
    }
    print(
        f"copy {record['roofline_hbm_gbps']:.0f} GB/s, read {record['read_gbps']:.0f} GB/s, one 4 KB copy "
        f"kernel in a graph: {record['kernel_floor_us']:.2f} us",
        flush=True,
    )
    record["cublas"] = {
        "qwen3-0.6b": cublas_table(QWEN, 28, hw.hbm_bytes_per_s, hw.peak_flops),
        "llama-3-8b": cublas_table(LLAMA, 4, hw.hbm_bytes_per_s, hw.peak_flops),
    }
    print(f"{'model':12}{'rows':>5}" + "".join(f"{p:>20}" for p in QWEN) + "   (cuBLAS us / ideal us)")
    for model, rows in record["cublas"].items():
        for m in ROWS:
            cells = [r for r in rows if r["rows"] == m]
            print(f"{model:12}{m:>5}" + "".join(f"{r['cublas_us']:>11.2f} / {r['ideal_us']:5.2f}" for r in cells))
    record["triton_sweep"] = triton_sweep(args.budget_s)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
