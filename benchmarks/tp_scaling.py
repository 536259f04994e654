"""Tensor-parallel scaling of decode on one host: Llama-3-8B (dummy weights) at TP 1/2/4/8, batch 1...256.

For each TP size that the GPUs allow, the engine (mp executor, NCCL, CUDA graphs) prefills a batch of
random prompts, then times decode steps; each step's ideal is the roofline of `tp` GPUs together
(weights + KV bytes over tp x the measured copy bandwidth, FLOPs over tp x the measured bf16 peak), so
`%roofline` says how much of the aggregate machine a step uses. The all-reduce time per step is measured
apart, in a fresh group of `tp` processes: one NCCL all-reduce of a [batch, hidden] bf16 tensor (what
each row-parallel layer sends) timed in a CUDA graph, times the 2 x layers + 1 all-reduces of a step.

    python benchmarks/tp_scaling.py [--model llama-3-8b] [--tp 1,2,4,8] [--batch 1,8,32,64,128,256]
        [--input-len 512] [--steps 64] [--output-dir benchmarks/results/h200]

Writes tp_scaling_<model>.json and .md (with this command) to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch


def allreduce_us(rank: int, world: int, port: int, sizes: list[tuple[int, int]], result) -> None:
    """One rank of the all-reduce probe: microseconds of one all-reduce per [rows, hidden] size."""
    import torch.distributed as dist

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    for rows, hidden in sizes:
        x = torch.ones(rows, hidden, dtype=torch.bfloat16, device="cuda")
        for _ in range(5):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                dist.all_reduce(x)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        out[rows] = start.elapsed_time(end) * 1000 / 200
    if rank == 0:
        result.update(out)
    dist.destroy_process_group()


def probe_allreduce(world: int, hidden: int, batches: list[int]) -> dict[int, float]:
    import torch.multiprocessing as mp

    from mini_infer.distributed.executor import free_port

    if world == 1:
        return {b: 0.0 for b in batches}
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(allreduce_us, args=(world, free_port(), [(b, hidden) for b in batches], result), nprocs=world)
        return dict(result)


def decode_steps(llm, batch: int, input_len: int, steps: int) -> float:
    """Mean seconds of a decode step of `batch` sequences, after their prefill."""
    from mini_infer import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(
            f"b{batch}-{i}", {"prompt_token_ids": [(i * 7 + j) % 1000 + 10 for j in range(input_len)]}, params
        )
    scheduler = engine.scheduler
    while scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running):
        engine.step()
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    while engine.has_unfinished_requests():
        engine.step()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--tp", default="1,2,4,8")
    ap.add_argument("--batch", default="1,8,32,64,128,256")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--output-dir", default="benchmarks/results/h200")
    args = ap.parse_args()
    from mini_infer import LLM
    from mini_infer.bench.roofline import ModelShape, decode_step_cost, measure_hardware
    from mini_infer.model_loader import load_hf_config, resolve_model_path

    batches = [int(b) for b in args.batch.split(",")]
    gpus = torch.cuda.device_count()
    sizes = [t for t in (int(t) for t in args.tp.split(",")) if t <= gpus]
    hw = measure_hardware()
    config = load_hf_config(resolve_model_path(args.model, "dummy"))
    shape = ModelShape.from_hf_config(config)
    rows = []
    for tp in sizes:
        ar = probe_allreduce(tp, config.hidden_size, batches)
        llm = LLM(
            args.model,
            load_format="dummy",
            tensor_parallel_size=tp,
            max_model_len=args.input_len + args.steps + 64,
            max_num_seqs=max(batches),
        )
        for batch in batches:
            seconds = decode_steps(llm, batch, args.input_len, args.steps)
            context = [args.input_len + 4 + args.steps // 2] * batch
            ideal = decode_step_cost(shape, context, 2).ideal_seconds(
                type(hw)(hw.hbm_bytes_per_s * tp, hw.peak_flops * tp)
            )
            per_step_ar = ar[batch] * (2 * config.num_hidden_layers + 1)
            rows.append(
                {
                    "tp": tp,
                    "batch": batch,
                    "step_ms": seconds * 1e3,
                    "tokens_per_s": batch / seconds,
                    "ideal_ms": ideal * 1e3,
                    "pct_roofline": 100 * ideal / seconds,
                    "allreduce_us_each": ar[batch],
                    "allreduce_ms_per_step": per_step_ar / 1e3,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        llm.llm_engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "model": args.model,
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "hardware_per_gpu": {"hbm_bytes_per_s": hw.hbm_bytes_per_s, "peak_flops": hw.peak_flops},
        "input_len": args.input_len,
        "rows": rows,
    }
    (out / f"tp_scaling_{args.model}.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# TP scaling, {args.model} (dummy weights), decode after {args.input_len}-token prompts",
        "",
        f"`{command}`",
        "",
        "| TP | batch | step ms | tok/s | ideal ms | % aggregate roofline | all-reduce ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tp']} | {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['ideal_ms']:.2f} "
            f"| {r['pct_roofline']:.0f} | {r['allreduce_ms_per_step']:.3f} |"
        )
    (out / f"tp_scaling_{args.model}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
