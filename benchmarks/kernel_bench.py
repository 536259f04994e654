"""Kernel benchmark on one GPU: Triton vs eager PyTorch vs torch.compile vs the hardware ceilings.

Llama-3-8B shapes (hidden 4096, 32 query heads, 8 KV heads, head dim 128, intermediate 14336, vocabulary
128256; the GEMV rows are its batch-1 and batch-2 decode projections against cuBLAS). For
each kernel: median time (`triton.testing.do_bench`, L2 flushed before every run; not graph_timer.py's
CUDA-graph replays, since some eager and torch.compile baselines cannot be captured), achieved GB/s or
TFLOP/s, the share of the HBM bandwidth or bf16 tensor peak measured in this same run, speed-ups
over the eager reference and over `torch.compile` of it, and the error against a float32 reference
on fresh random inputs. Attention baselines are vectorised (gather the pages, then SDPA), not the
per-sequence loop of the references; prefill is also compared with SDPA's flash kernel on
contiguous K/V. The ceilings are the roofline's own probes (`mini_infer.bench.roofline`). Writes
benchmarks/results/<gpu>/kernels_<gpu>.json (or --out DIR) and prints a table last.

    PYTHONPATH=. python benchmarks/kernel_bench.py [--out DIR] [--sweep] [--only gemv,decode]   (from the repo root)
"""

import argparse
import json
import math
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from mini_infer.bench.roofline import measure_hbm_bandwidth, measure_tensor_peak
from mini_infer.kernels.act_quant import act_quant_triton
from mini_infer.kernels.activation import silu_and_mul_quant_triton, silu_and_mul_ref, silu_and_mul_triton
from mini_infer.kernels.decode_attention import DEFAULT_DECODE_CONFIG, DecodeConfig, decode_attention_triton
from mini_infer.kernels.gemv import GemvConfig, gemv_triton, linear_ref
from mini_infer.kernels.paged_attention import decode_attention_ref, prefill_attention_ref
from mini_infer.kernels.prefill_attention import (
    DEFAULT_PREFILL_CONFIG,
    PrefillConfig,
    build_prefill_tiles,
    prefill_attention_triton,
)
from mini_infer.kernels.rmsnorm import (
    _launch_rms_norm,
    fused_add_rms_norm_quant_triton,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from mini_infer.kernels.rotary_store import rotary_store_kv_ref, rotary_store_kv_triton

HIDDEN, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336
VOCAB = 128256
TOKENS = 4096
PAGE = 16
EPS = 1e-5
DTYPE = torch.bfloat16
DEVICE = "cuda"


ROUNDS = 3


def median_ms(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_rounds(
    fns: dict[str, Callable[[], object] | None],
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median over ROUNDS interleaved do_bench medians per function (Triton and its baselines see
    the same clocks and power state), and every round's value to show the spread."""
    live = {name: fn for name, fn in fns.items() if fn is not None}
    rounds: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(ROUNDS):
        for name, fn in live.items():
            rounds[name].append(median_ms(fn))
    return {name: statistics.median(ms) for name, ms in rounds.items()}, rounds


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def measure_ceilings() -> dict:
    """A 1 GiB device copy (read + write) and an 8192^3 bf16 matmul, as the roofline measures them."""
    return {"hbm_copy_GBps": measure_hbm_bandwidth() / 1e9, "bf16_matmul_TFLOPs": measure_tensor_peak() / 1e12}


class Report:
    """Collects rows (one per kernel and size) and prints them."""

    def __init__(self, ceilings: dict):
        self.ceilings = ceilings
        self.rows: list[dict] = []

    def add(
        self,
        kernel: str,
        size: str,
        triton_ms: float,
        baselines: dict[str, float | None],
        rel_error: float,
        bytes_moved: float | None = None,
        flops: float | None = None,
        note: str = "",
        rounds: dict[str, list[float]] | None = None,
    ) -> dict:
        row = {"kernel": kernel, "size": size, "triton_ms": triton_ms, "baselines_ms": baselines}
        if rounds is not None:
            row["rounds_ms"] = rounds
        if bytes_moved is not None:
            row["GBps"] = bytes_moved / (triton_ms * 1e-3) / 1e9
            row["pct_hbm"] = 100 * row["GBps"] / self.ceilings["hbm_copy_GBps"]
        if flops is not None:
            row["TFLOPs"] = flops / (triton_ms * 1e-3) / 1e12
            row["pct_bf16_peak"] = 100 * row["TFLOPs"] / self.ceilings["bf16_matmul_TFLOPs"]
        row["speedup"] = {name: ms / triton_ms for name, ms in baselines.items() if ms}
        row["rel_err_vs_fp32"] = rel_error
        row["note"] = note
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def set_ceilings(self, ceilings: dict) -> None:
        """Recompute every row's share of the ceilings (after a second ceiling measurement)."""
        self.ceilings = ceilings
        for row in self.rows:
            if "GBps" in row:
                row["pct_hbm"] = 100 * row["GBps"] / ceilings["hbm_copy_GBps"]
            if "TFLOPs" in row:
                row["pct_bf16_peak"] = 100 * row["TFLOPs"] / ceilings["bf16_matmul_TFLOPs"]

    def table(self) -> str:
        head = (
            f"{'kernel':<22}{'size':<28}{'triton us':>10}{'eager us':>10}{'compile us':>11}"
            f"{'rate':>14}{'% ceil':>8}{'x eager':>8}{'x comp':>8}{'x flash':>8}{'rel err':>9}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            base, speedup = r["baselines_ms"], r["speedup"]
            if "TFLOPs" in r:
                rate, pct = f"{r['TFLOPs']:.0f} TFLOP/s", r["pct_bf16_peak"]
            else:
                rate, pct = f"{r['GBps']:.0f} GB/s", r["pct_hbm"]
            us = {name: f"{ms * 1e3:.1f}" if ms else "-" for name, ms in base.items()}
            x = {name: f"{s:.2f}" for name, s in speedup.items()}
            lines.append(
                f"{r['kernel']:<22}{r['size']:<28}{r['triton_ms'] * 1e3:>10.1f}{us.get('eager', '-'):>10}"
                f"{us.get('compile', '-'):>11}{rate:>14}{pct:>7.1f}%{x.get('eager', '-'):>8}"
                f"{x.get('compile', '-'):>8}{x.get('sdpa_flash', '-'):>8}{r['rel_err_vs_fp32']:>9.1e}"
            )
        return "\n".join(lines)


def try_compiled(fn: Callable, *args) -> Callable[[], object] | None:
    """torch.compile(fn) bound to args and warmed up, or None if compiling fails (error printed)."""
    try:
        cfn = compiled(fn)
        cfn(*args)
        torch.cuda.synchronize()
        return lambda: cfn(*args)
    except Exception as exc:  # report and go on: one baseline must not sink the whole run
        print(f"torch.compile failed for {getattr(fn, '__name__', fn)}: {exc!r}"[:400], flush=True)
        return None


def measure(report: "Report", kernel: str, size: str, fns: dict, rel_error: float, **work) -> dict:
    """Time fns["triton"] and its baselines in interleaved rounds and add the row."""
    times, rounds = time_rounds(fns)
    triton_ms = times.pop("triton")
    return report.add(kernel, size, triton_ms, times, rel_error, rounds=rounds, **work)


# ----------------------------------------------------------------------------- elementwise kernels


def bench_rms_norm(report: Report, sweep: dict | None) -> None:
    x = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=DTYPE)
    w = torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE)
    err = rel_err(rms_norm_triton(x, w, EPS), rms_norm_ref(x.float(), w.float(), EPS))
    fns = {
        "triton": lambda: rms_norm_triton(x, w, EPS),
        "eager": lambda: rms_norm_ref(x, w, EPS),
        "compile": try_compiled(rms_norm_ref, x, w, EPS),
    }
    measure(report, "rms_norm", f"{TOKENS}x{HIDDEN}", fns, err, bytes_moved=2 * x.nbytes + w.nbytes)
    if sweep is not None:
        for warps in (4, 8, 16, 32):
            sweep.setdefault("rms_norm_num_warps", {})[warps] = median_ms(
                lambda warps=warps: _launch_rms_norm(x, None, w, EPS, num_warps=warps)
            )

    residual = torch.randn_like(x)
    res_t, res_ref = residual.clone(), residual.float()
    out = fused_add_rms_norm_triton(x, res_t, w, EPS)
    ref = fused_add_rms_norm_ref(x.float(), res_ref, w.float(), EPS)
    err = max(rel_err(out, ref), rel_err(res_t, res_ref))
    fns = {
        "triton": lambda: fused_add_rms_norm_triton(x, residual, w, EPS),
        "eager": lambda: fused_add_rms_norm_ref(x, residual, w, EPS),
        "compile": try_compiled(fused_add_rms_norm_ref, x, residual, w, EPS),
    }
    size = f"{TOKENS}x{HIDDEN}"
    measure(report, "fused_add_rms_norm", size, fns, err, bytes_moved=4 * x.nbytes + w.nbytes)
    if sweep is not None:
        for warps in (4, 8, 16, 32):
            sweep.setdefault("fused_add_rms_norm_num_warps", {})[warps] = median_ms(
                lambda warps=warps: _launch_rms_norm(x, residual, w, EPS, num_warps=warps)
            )


def rope_cache(max_pos: int) -> torch.Tensor:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    freqs = torch.outer(torch.arange(max_pos, device=DEVICE).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def qkv_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = qkv.split([NUM_Q_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
    t = qkv.shape[0]
    return (
        q.view(t, NUM_Q_HEADS, HEAD_DIM),
        k.view(t, NUM_KV_HEADS, HEAD_DIM),
        v.view(t, NUM_KV_HEADS, HEAD_DIM),
    )


def bench_rotary_store_kv(report: Report) -> None:
    """The attention prologue in place on views of the qkv buffer: RoPE and the KV-cache store, then
    with the per-head q/k RMSNorm too (Qwen3-8B has these head shapes and the norm)."""
    cache = rope_cache(8192)
    positions = torch.randint(0, 8192, (TOKENS,), device=DEVICE)
    qkv = torch.randn(TOKENS, (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device=DEVICE, dtype=DTYPE)
    q, k, v = qkv_views(qkv)
    num_blocks = 4 * TOKENS // PAGE
    k_cache = torch.randn(num_blocks, PAGE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_blocks * PAGE, device=DEVICE)[:TOKENS]
    slots[::97] = -1
    stored = int((slots >= 0).sum().item())
    # q, k read and written in place, v read, k and v written to the cache, cos/sin and slots read
    moved = (2 * (q.numel() + k.numel()) + v.numel() + 2 * stored * NUM_KV_HEADS * HEAD_DIM) * q.element_size()
    moved += TOKENS * (HEAD_DIM * 4 + 8) + slots.nbytes
    for norm in (False, True):
        weights = [torch.randn(HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2)] if norm else [None, None]
        buf, k_c, v_c = qkv.clone(), k_cache.clone(), v_cache.clone()
        rotary_store_kv_triton(positions, *qkv_views(buf), cache, k_c, v_c, slots, *weights, EPS)
        ref, k_ref, v_ref = qkv.float(), k_cache.float(), v_cache.float()
        weights32 = [w.float() if w is not None else None for w in weights]
        rotary_store_kv_ref(positions, *qkv_views(ref), cache, k_ref, v_ref, slots, *weights32, EPS)
        err = max(rel_err(buf, ref), rel_err(k_c, k_ref), rel_err(v_c, v_ref))
        args = (positions, q, k, v, cache, k_cache, v_cache, slots, *weights, EPS)
        fns = {
            "triton": lambda args=args: rotary_store_kv_triton(*args),
            "eager": lambda args=args: rotary_store_kv_ref(*args),
            "compile": try_compiled(rotary_store_kv_ref, *args),
        }
        name = "rotary_store_kv" + (" + q/k norm" if norm else "")
        measure(report, name, f"{TOKENS} tok, 32q+8k heads, page {PAGE}", fns, err, bytes_moved=moved)


def bench_silu_and_mul(report: Report, sweep: dict | None) -> None:
    x = torch.randn(TOKENS, 2 * INTERMEDIATE, device=DEVICE, dtype=DTYPE)
    err = rel_err(silu_and_mul_triton(x), silu_and_mul_ref(x.float()))
    fns = {
        "triton": lambda: silu_and_mul_triton(x),
        "eager": lambda: silu_and_mul_ref(x),
        "compile": try_compiled(silu_and_mul_ref, x),
    }
    measure(report, "silu_and_mul", f"{TOKENS}x2x{INTERMEDIATE}", fns, err, bytes_moved=x.nbytes * 3 // 2)
    if sweep is not None:
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (512, 4)):
            sweep.setdefault("silu_and_mul_block_warps", {})[f"{block}/{warps}"] = median_ms(
                lambda block=block, warps=warps: silu_and_mul_triton(x, block=block, num_warps=warps)
            )


def dequantized(q) -> torch.Tensor:
    return q.values.float() * q.scales


def bench_act_quant_fusion(report: Report, sweep: dict | None) -> None:
    """add+RMSNorm and SiLU-and-mul emitting fp8 values and per-token scales (one launch) against the
    unfused pair the W8A8 projection would otherwise run: the op, then act_quant_triton. Here the "eager"
    baseline is that unfused Triton pair; rel err is against its dequantized output (0: the same bits)."""
    fp8 = torch.float8_e4m3fn
    for rows in (1, 8, 64, TOKENS):
        x = torch.randn(rows, HIDDEN, device=DEVICE, dtype=DTYPE)
        w = torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE)
        residual = torch.randn_like(x)

        def unfused_norm(x=x, residual=residual, w=w):
            return act_quant_triton(fused_add_rms_norm_triton(x, residual, w, EPS), fp8)

        def fused_norm(x=x, residual=residual, w=w):
            return fused_add_rms_norm_quant_triton(x, residual, w, EPS, fp8)

        fused = fused_add_rms_norm_quant_triton(x, residual.clone(), w, EPS, fp8)
        q, s = act_quant_triton(fused_add_rms_norm_triton(x, residual.clone(), w, EPS), fp8)
        err = rel_err(dequantized(fused), q.float() * s)
        fns = {"triton": fused_norm, "eager": unfused_norm}
        moved = 3 * x.nbytes + w.nbytes + x.numel() + 4 * rows  # x, residual read + written; fp8 out, scales
        measure(report, "add_rms_norm -> fp8", f"{rows}x{HIDDEN}", fns, err, bytes_moved=moved)

        g = torch.randn(rows, 2 * INTERMEDIATE, device=DEVICE, dtype=DTYPE)
        fused = silu_and_mul_quant_triton(g, fp8)
        q, s = act_quant_triton(silu_and_mul_triton(g), fp8)
        err = rel_err(dequantized(fused), q.float() * s)
        fns = {
            "triton": lambda g=g: silu_and_mul_quant_triton(g, fp8),
            "eager": lambda g=g: act_quant_triton(silu_and_mul_triton(g), fp8),
        }
        moved = g.nbytes + g.numel() // 2 + 4 * rows
        measure(report, "silu_and_mul -> fp8", f"{rows}x2x{INTERMEDIATE}", fns, err, bytes_moved=moved)
        if sweep is not None:
            for block, warps in ((16384, 16), (8192, 16), (8192, 8), (4096, 8), (2048, 4), (1024, 4)):
                sweep.setdefault(f"silu_and_mul_quant_block_warps_rows{rows}", {})[f"{block}/{warps}"] = median_ms(
                    lambda g=g, block=block, warps=warps: silu_and_mul_quant_triton(
                        g, fp8, block=block, num_warps=warps
                    )
                )


def bench_gemv(report: Report, rows: int, sweep: dict | None) -> None:
    """Batch-1 (or 2) decode projections: each weight read once, so the rate is the weight bytes over time."""
    shapes = {
        "qkv_proj": ((NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, HIDDEN),
        "o_proj": (HIDDEN, NUM_Q_HEADS * HEAD_DIM),
        "gate_up_proj": (2 * INTERMEDIATE, HIDDEN),
        "down_proj": (HIDDEN, INTERMEDIATE),
        "lm_head": (VOCAB, HIDDEN),
    }
    for name, (n, k) in shapes.items():
        x = torch.randn(rows, k, device=DEVICE, dtype=DTYPE)
        w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) / k**0.5
        err = rel_err(gemv_triton(x, w), linear_ref(x.float(), w.float()))
        fns = {"triton": lambda x=x, w=w: gemv_triton(x, w), "eager": lambda x=x, w=w: linear_ref(x, w)}
        measure(report, f"gemv {name}", f"{rows}x{k} @ {n}x{k}", fns, err, bytes_moved=w.nbytes + x.nbytes)
        if sweep is not None:
            for bn, bk, warps, stages in (
                (4, 1024, 4, 3),
                (4, 1024, 4, 4),
                (8, 1024, 4, 3),
                (8, 512, 4, 3),
                (4, 2048, 8, 3),
                (2, 2048, 4, 3),
                (16, 512, 4, 4),
            ):
                config = GemvConfig(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
                sweep.setdefault(f"gemv_{name}_{rows}_rows", {})[f"{bn}/{bk}/{warps}/{stages}"] = median_ms(
                    lambda x=x, w=w, config=config: gemv_triton(x, w, config=config)
                )
        del w


# ----------------------------------------------------------------------------- attention


def paged_cache(batch: int, context: int, page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches filled with random data and block tables scattering each sequence over pages."""
    blocks_per_seq = context // page
    num_blocks = batch * blocks_per_seq + 1
    k_cache = torch.randn(num_blocks, page, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks - 1, device=DEVICE) + 1
    block_tables = order.view(batch, blocks_per_seq).int()
    return k_cache, v_cache, block_tables


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, Hk, S, D] from the paged cache (equal lengths: the fair vectorised torch baseline)."""
    batch = block_tables.shape[0]
    return cache[block_tables.long()].view(batch, -1, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)


def torch_decode(q, k_cache, v_cache, block_tables, scale):
    k, v = gather_kv(k_cache, block_tables), gather_kv(v_cache, block_tables)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def bench_decode(report: Report, batch: int, context: int, sweep: dict | None) -> None:
    k_cache, v_cache, block_tables = paged_cache(batch, context, PAGE)
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    seq_lens = torch.full((batch,), context, device=DEVICE, dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    out = decode_attention_triton(q, k_cache, v_cache, seq_lens, block_tables, scale)
    ref = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), seq_lens, block_tables, scale)
    err = rel_err(out, ref)
    del ref
    torch.cuda.empty_cache()
    moved = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2 + 2 * q.nbytes + block_tables.nbytes
    fns = {
        "triton": lambda: decode_attention_triton(q, k_cache, v_cache, seq_lens, block_tables, scale),
        "eager": lambda: torch_decode(q, k_cache, v_cache, block_tables, scale),
        "compile": try_compiled(torch_decode, q, k_cache, v_cache, block_tables, scale),
    }
    size = f"{batch} seq x {context} ctx, page {PAGE}"
    measure(report, "decode_attention", size, fns, err, bytes_moved=moved, note="eager = gather + SDPA")
    if sweep is not None:
        configs = [
            DEFAULT_DECODE_CONFIG,
            DecodeConfig(block_n=64, num_warps=4, num_stages=4),
            DecodeConfig(block_n=32, num_warps=4, num_stages=4),
            DecodeConfig(block_n=32, num_warps=2, num_stages=3),
            DecodeConfig(block_n=128, num_warps=8, num_stages=3),
            DecodeConfig(block_n=64, num_warps=8, num_stages=3),
            DecodeConfig(programs_per_sm=2),
            DecodeConfig(programs_per_sm=8),
            DecodeConfig(programs_per_sm=16),
        ]
        results = sweep.setdefault(f"decode_{batch}x{context}", {})
        hbm = report.ceilings["hbm_copy_GBps"]
        for cfg in configs:
            ms = median_ms(
                lambda cfg=cfg: decode_attention_triton(q, k_cache, v_cache, seq_lens, block_tables, scale, config=cfg)
            )
            results[repr(cfg)] = {"ms": ms, "pct_hbm": 100 * moved / (ms * 1e-3) / 1e9 / hbm}
        # The same attention over 64-token pages: one block-table lookup per key tile.
        k64, v64 = (
            gather_kv(c, block_tables).transpose(1, 2).reshape(-1, 64, NUM_KV_HEADS, HEAD_DIM)
            for c in (k_cache, v_cache)
        )
        table64 = torch.arange(k64.shape[0], device=DEVICE, dtype=torch.int32).view(batch, -1)
        ms = median_ms(lambda: decode_attention_triton(q, k64, v64, seq_lens, table64, scale))
        results["page 64, default config"] = {"ms": ms, "pct_hbm": 100 * moved / (ms * 1e-3) / 1e9 / hbm}


def flash_attention(q, k, v, scale):
    """SDPA's flash kernel; its causal mask is aligned bottom-right (query i sees keys <= S - L + i)."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[0]


def torch_prefill(q, k_cache, v_cache, block_tables, scale):
    k, v = gather_kv(k_cache, block_tables), gather_kv(v_cache, block_tables)
    return flash_attention(q.transpose(0, 1).unsqueeze(0), k, v, scale)


def bench_prefill(report: Report, prefix: int, sweep: dict | None) -> None:
    new = TOKENS
    context = prefix + new
    k_cache, v_cache, block_tables = paged_cache(1, context, PAGE)
    q = torch.randn(new, NUM_Q_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    cu_seqlens = torch.tensor([0, new], device=DEVICE, dtype=torch.int32)
    seq_lens = torch.tensor([context], device=DEVICE, dtype=torch.int32)
    scale = HEAD_DIM**-0.5

    def work_list(block_m: int) -> torch.Tensor:  # built once, outside the timing, as the engine does
        return torch.from_numpy(build_prefill_tiles(np.array([new]), np.array([context]), block_m)).to(DEVICE)

    def run(config: PrefillConfig = DEFAULT_PREFILL_CONFIG, tiles: torch.Tensor | None = None):
        tiles = work_list(config.block_m) if tiles is None else tiles
        return prefill_attention_triton(
            q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, scale, tiles=tiles, config=config
        )

    ref = prefill_attention_ref(q.float(), k_cache.float(), v_cache.float(), cu_seqlens, seq_lens, block_tables, scale)
    err = rel_err(run(), ref)
    # SDPA flash on contiguous K/V, gathered once outside the timing; GQA heads expanded if needed.
    q4 = q.transpose(0, 1).unsqueeze(0)
    k4, v4 = gather_kv(k_cache, block_tables).contiguous(), gather_kv(v_cache, block_tables).contiguous()
    note = "flash = SDPA flash kernel on contiguous K/V; eager = gather pages + flash"
    try:
        flash_attention(q4, k4, v4, scale)
    except RuntimeError:
        k4 = k4.repeat_interleave(NUM_Q_HEADS // NUM_KV_HEADS, dim=1)
        v4 = v4.repeat_interleave(NUM_Q_HEADS // NUM_KV_HEADS, dim=1)
        note += " (K/V heads expanded: flash rejected GQA)"
    flash_err = rel_err(flash_attention(q4, k4, v4, scale).squeeze(0).transpose(0, 1), ref)
    note += f"; flash rel err {flash_err:.1e}"
    del ref
    torch.cuda.empty_cache()
    visits = new * prefix + new * (new + 1) / 2  # (query, key) pairs under the causal mask
    flops = 4 * HEAD_DIM * NUM_Q_HEADS * visits
    default_tiles = work_list(DEFAULT_PREFILL_CONFIG.block_m)
    fns = {
        "triton": lambda: run(tiles=default_tiles),
        "sdpa_flash": lambda: flash_attention(q4, k4, v4, scale),
        "eager": lambda: torch_prefill(q, k_cache, v_cache, block_tables, scale),
        "compile": try_compiled(torch_prefill, q, k_cache, v_cache, block_tables, scale),
    }
    size = f"{new} new + {prefix} cached, page {PAGE}"
    measure(report, "prefill_attention", size, fns, err, flops=flops, note=note)
    if sweep is not None:
        configs = [
            DEFAULT_PREFILL_CONFIG,
            PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=4),
            PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=3),
            PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
            PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
            PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=4),
        ]
        results = sweep.setdefault(f"prefill_{new}+{prefix}", {})
        for cfg in configs:
            cfg_tiles = work_list(cfg.block_m)
            ms = median_ms(lambda cfg=cfg, cfg_tiles=cfg_tiles: run(cfg, cfg_tiles))
            results[repr(cfg)] = {"ms": ms, "TFLOPs": flops / (ms * 1e-3) / 1e12}
        # The same attention over 64-token pages: one block-table lookup per key tile.
        k64, v64 = (c[0].transpose(0, 1).reshape(-1, 64, NUM_KV_HEADS, HEAD_DIM) for c in (k4, v4))
        table64 = torch.arange(k64.shape[0], device=DEVICE, dtype=torch.int32).view(1, -1)
        if k64.shape[2] == NUM_KV_HEADS:
            ms = median_ms(
                lambda: prefill_attention_triton(q, k64, v64, cu_seqlens, seq_lens, table64, scale, tiles=default_tiles)
            )
            results["page 64, default config"] = {"ms": ms, "TFLOPs": flops / (ms * 1e-3) / 1e12}


def gpu_slug(name: str) -> str:
    for known in ("h100", "h200", "a100", "l40s", "l4", "b200"):
        if known in name.lower():
            return known
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="(default: benchmarks/results/<gpu>)")
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated steps: rms_norm,rotary_store_kv,silu_and_mul,act_quant_fusion,gemv,decode,prefill",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    name = torch.cuda.get_device_name()
    info = {
        "command": " ".join(["PYTHONPATH=. python", *sys.argv]),
        "gpu": name,
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(DTYPE),
        "timing": (
            f"median of {ROUNDS} interleaved rounds of triton.testing.do_bench (return_mode='median', "
            "warmup 25 ms, rep 200 ms, L2 flushed before each call); sweeps: one round"
        ),
    }
    print(json.dumps(info), flush=True)
    ceilings = measure_ceilings()
    print(json.dumps(ceilings), flush=True)
    report = Report(ceilings)
    sweep: dict | None = {} if args.sweep else None
    steps = [
        ("rms_norm", lambda: bench_rms_norm(report, sweep)),
        ("rotary_store_kv", lambda: bench_rotary_store_kv(report)),
        ("silu_and_mul", lambda: bench_silu_and_mul(report, sweep)),
        ("act_quant_fusion", lambda: bench_act_quant_fusion(report, sweep)),
        ("gemv", lambda: bench_gemv(report, 1, sweep)),
        ("gemv", lambda: bench_gemv(report, 2, sweep)),
        ("decode", lambda: bench_decode(report, 64, 4096, sweep)),
        ("decode", lambda: bench_decode(report, 4, 32768, sweep)),
        ("prefill", lambda: bench_prefill(report, 0, sweep)),
        ("prefill", lambda: bench_prefill(report, 4096, sweep)),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        steps = [(name, step) for name, step in steps if name in wanted]
    errors = []
    for _, step in steps:
        try:
            step()
        except Exception:  # keep measuring the other kernels; the failure is reported below
            errors.append(traceback.format_exc())
            print(errors[-1], flush=True)
        torch.cuda.empty_cache()
    # Ceilings again at the end; the higher of the two readings is used, so shares err low.
    ceilings_end = measure_ceilings()
    ceilings = {
        "hbm_copy_GBps": max(ceilings["hbm_copy_GBps"], ceilings_end["hbm_copy_GBps"]),
        "bf16_matmul_TFLOPs": max(ceilings["bf16_matmul_TFLOPs"], ceilings_end["bf16_matmul_TFLOPs"]),
        "start": ceilings,
        "end": ceilings_end,
    }
    report.set_ceilings(ceilings)
    info["seconds"] = round(time.time() - started, 1)
    result = {**info, "ceilings": ceilings, "rows": report.rows, "errors": errors}
    if sweep is not None:
        result["sweep"] = sweep
    out = args.out or Path(__file__).parent / "results" / gpu_slug(name)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{gpu_slug(name)}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}")
    if sweep:
        print(json.dumps(sweep, indent=1, default=str))
    print(
        f"\n{name} | torch {torch.__version__} | triton {triton.__version__} | "
        f"HBM copy {ceilings['hbm_copy_GBps']:.0f} GB/s | "
        f"bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s"
    )
    print(report.table())
    if errors or not all(math.isfinite(r["rel_err_vs_fp32"]) for r in report.rows):
        sys.exit(f"{len(errors)} benchmark steps failed or produced non-finite output")


if __name__ == "__main__":
    main()
