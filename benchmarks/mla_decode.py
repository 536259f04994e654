"""MLA decode on the GPU: the latent kernel against the PyTorch reference, torch.compile and the
expanded path, then DeepSeek-V2-Lite decode steps in the engine (dummy weights) and the concurrency its
KV pool allows at 4k context against a dense preset (llama-3-8b by default).

Kernel part: one layer's decode attention over a paged latent cache (bf16, 576 values per token), for
DeepSeek-V2-Lite (16 heads) and V3 (128 heads) at batch x context 64 x 4k, 4 x 32k and a batch sweep at
4k. "% HBM" is the latent bytes read (batch * context * 576 * 2) per second over the measured copy
bandwidth. The reference is the absorbed arithmetic batched in torch (gather, two einsums, softmax);
"expanded" gathers the same latent and up-projects it through kv_b_proj into per-head K/V before SDPA,
as a non-absorbed implementation does. All timed as CUDA-graph replays (graph_timer.py).

Engine part: B requests of --input-len random tokens decode --output-len tokens; the median of the
last steps (pure decode) is the step time, against a roofline of the weight bytes a step reads (dense
weights, plus the experts B tokens touch on average under uniform routing) and the latent cache.

    python benchmarks/mla_decode.py                       # both parts
    python benchmarks/mla_decode.py --skip-engine         # the kernel part only
Writes benchmarks/results/h200/mla_decode.json and .md (with this command line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from graph_timer import graph_us

from mini_infer.bench.roofline import measure_hbm_bandwidth
from mini_infer.kernels.mla_decode import mla_attention_triton

R, P, NOPE, V, PAGE = 512, 64, 128, 128, 16
RESULTS = Path(__file__).parent / "results" / "h200"


def latent_ref(q, cache, tables, num_keys, scale):
    """Absorbed decode in torch, every row num_keys long: [B, H, R]."""
    latent = cache[tables[:, : num_keys // PAGE].long()].flatten(1, 2)  # [B, S, R + P]
    scores = torch.einsum("bhd,bsd->bhs", q.float(), latent.float()) * scale
    return torch.einsum("bhs,bsr->bhr", scores.softmax(-1), latent[..., :R].float()).to(q.dtype)


def expanded(q_full, cache, tables, num_keys, w_kv, scale):
    """Non-absorbed decode: latent -> per-head K [B, H, S, 192] and V [B, H, S, 128], then SDPA."""
    latent = cache[tables[:, : num_keys // PAGE].long()].flatten(1, 2)
    B, S, H = latent.shape[0], latent.shape[1], q_full.shape[1]
    kv = (latent[..., :R] @ w_kv.t()).view(B, S, H, NOPE + V)
    k = torch.cat((kv[..., :NOPE], latent[..., R:].unsqueeze(2).expand(B, S, H, P)), dim=-1).transpose(1, 2)
    v = kv[..., NOPE:].transpose(1, 2)
    return F.scaled_dot_product_attention(q_full.unsqueeze(2), k, v, scale=scale).squeeze(2)


def kernel_case(batch: int, context: int, heads: int, gbps: float, with_compile: bool) -> dict:
    blocks = batch * context // PAGE
    cache = torch.randn(blocks + 8, PAGE, R + P, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(blocks, device="cuda").int().view(batch, context // PAGE)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, R + P, device="cuda", dtype=torch.bfloat16)
    scale = 0.07
    moved = batch * context * (R + P) * 2
    row = {"batch": batch, "context": context, "heads": heads, "latent_MB": moved / 1e6}
    got = mla_attention_triton(q, cache, lens, tables, R, scale)
    ref = latent_ref(q, cache, tables, context, scale)
    row["max_abs_err_vs_ref"] = (got.float() - ref.float()).abs().max().item()

    def pct(us: float) -> float:
        return 100 * moved / (us * 1e-6) / 1e9 / gbps

    timings = {"triton_latent": lambda: mla_attention_triton(q, cache, lens, tables, R, scale)}
    if batch * context * heads <= 64 * 4096 * 128:  # the reference's float32 scores must fit
        timings["torch_ref"] = lambda: latent_ref(q, cache, tables, context, scale)
        if with_compile:
            compiled = torch.compile(latent_ref, dynamic=False)
            timings["torch_compile"] = lambda: compiled(q, cache, tables, context, scale)
        w_kv = torch.randn(heads * (NOPE + V), R, device="cuda", dtype=torch.bfloat16) * 0.02
        q_full = torch.randn(batch, heads, NOPE + P, device="cuda", dtype=torch.bfloat16)
        if batch * context * heads * (NOPE + V + NOPE + P) * 2 < 40e9:
            timings["expanded"] = lambda: expanded(q_full, cache, tables, context, w_kv, scale)
    for name, fn in timings.items():
        try:
            us = graph_us(fn)
            row[name] = {"us": round(us, 2), "pct_hbm": round(pct(us), 1)}
        except Exception as e:  # noqa: BLE001 - a path that does not fit (memory, compile) is reported, not fatal
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def engine_part(batches: list[int], input_len: int, output_len: int, gbps: float, model: str) -> list[dict]:
    from mini_infer import LLM, SamplingParams
    from mini_infer.layers.fused_moe import FusedMoE

    llm = LLM(
        model,
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=input_len + output_len + 16,
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(8192, input_len),
    )
    engine = llm.llm_engine
    model, cfg = engine.model_runner.model, engine.model_runner.model.config
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    expert_bytes = sum(m.w13_weight.nbytes + m.w2_weight.nbytes for m in experts)
    dense_bytes = sum(p.nbytes for p in model.parameters()) - expert_bytes
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    rows = []
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        for run in range(2):  # an untimed run of the same shape first
            for i in range(batch):
                ids = torch.randint(3, cfg.vocab_size, (input_len,), generator=gen).tolist()
                engine.add_request(f"{batch}-{run}-{i}", {"prompt_token_ids": ids}, params)
            times = []
            while engine.has_unfinished_requests():
                t = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t)
        step = statistics.median(times[-(output_len // 2) :])
        touched = E * (1 - (1 - k / E) ** batch) / E
        context = input_len + output_len * 3 // 4
        entry = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        bytes_ = dense_bytes + touched * expert_bytes + batch * context * entry * 2 * cfg.num_hidden_layers
        row = {
            "batch": batch,
            "step_ms": round(step * 1e3, 3),
            "tok_s": round(batch / step, 1),
            "roofline_ms": round(bytes_ / (gbps * 1e9) * 1e3, 3),
            "pct_roofline": round(100 * bytes_ / (gbps * 1e9) / step, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def concurrency_part(models: list[str], context: int) -> list[dict]:
    """How many sequences of `context` tokens each model's KV pool holds, from the engine's own sizing
    (gpu_memory_utilization's default, eager so no graph reserve differs between them)."""
    import gc

    from mini_infer import LLM

    rows = []
    for name in models:
        llm = LLM(
            name, load_format="dummy", dtype="bfloat16", max_model_len=context, max_num_seqs=16384, enforce_eager=True
        )
        stats = llm.llm_engine.stats
        runner = llm.llm_engine.model_runner
        row = {
            "model": name,
            "kv_bytes_per_token": runner.kv_cache.block_bytes // runner.block_size,
            "kv_blocks": stats.num_kv_blocks_total,
            "concurrent_seqs": round(stats.num_kv_blocks_total * runner.block_size / context, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del llm, runner, stats
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-concurrency", action="store_true")
    ap.add_argument("--model", default="deepseek-v2-lite", help="the engine part's model (a DeepSeek preset or folder)")
    ap.add_argument("--dense-model", default="llama-3-8b", help="the dense preset the concurrency is set against")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (its compile is slow)")
    ap.add_argument("--batches", default="1,4,16,64,128,256")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--output", default=str(RESULTS / "mla_decode"))
    args = ap.parse_args()
    gbps = measure_hbm_bandwidth() / 1e9
    batches = [int(b) for b in args.batches.split(",")]
    result = {
        "command": "python " + " ".join(sys.argv),
        "copy_GBps": round(gbps, 1),
        "device": torch.cuda.get_device_name(),
    }
    out = Path(args.output)
    if not args.skip_kernels:
        cases = [(64, 4096), (4, 32768)] + [(b, 4096) for b in batches if b != 64]
        result["kernel"] = [
            kernel_case(b, ctx, heads, gbps, not args.no_compile and (b, ctx) in ((64, 4096), (4, 32768)))
            for heads in (16, 128)
            for b, ctx in cases
        ]
        write(result, out)  # after each part: a run stopped by a time limit keeps what it measured
    if not args.skip_engine:
        result["engine_deepseek_v2_lite"] = engine_part(batches, args.input_len, args.output_len, gbps, args.model)
        write(result, out)
    if not args.skip_concurrency:
        result["concurrency_4k"] = concurrency_part([args.model, args.dense_model], 4096)
        write(result, out)


def write(result: dict, out: Path) -> None:
    """OUTPUT.json and OUTPUT.md of what `result` holds so far."""
    gbps = result["copy_GBps"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# MLA decode ({result['device']})",
        "",
        f"`{result['command']}`",
        "",
        f"copy bandwidth {gbps:.0f} GB/s",
        "",
    ]
    if "kernel" in result:
        lines += ["| heads | batch x context | path | us | % HBM |", "| --- | --- | --- | --- | --- |"]
        for row in result["kernel"]:
            for name in ("triton_latent", "torch_ref", "torch_compile", "expanded"):
                if name in row:
                    r = row[name]
                    lines.append(
                        f"| {row['heads']} | {row['batch']} x {row['context']} | {name} | "
                        f"{r.get('us', r.get('error'))} | {r.get('pct_hbm', '')} |"
                    )
    if "engine_deepseek_v2_lite" in result:
        lines += ["", "| batch | step ms | tok/s | roofline ms | % roofline |", "| --- | --- | --- | --- | --- |"]
        for r in result["engine_deepseek_v2_lite"]:
            lines.append(f"| {r['batch']} | {r['step_ms']} | {r['tok_s']} | {r['roofline_ms']} | {r['pct_roofline']} |")
    if "concurrency_4k" in result:
        lines += ["", "| model (4k context) | KV bytes/token | blocks | sequences |", "| --- | --- | --- | --- |"]
        for r in result["concurrency_4k"]:
            lines.append(f"| {r['model']} | {r['kv_bytes_per_token']} | {r['kv_blocks']} | {r['concurrent_seqs']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
