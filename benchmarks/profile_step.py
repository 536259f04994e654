"""Where a step's time goes: host phases, GPU kernels by name, and GPU idle time.

Runs a steady decode batch (every request past its prefill); with --new-prompt-len each profiled step
also takes --new-prompts new requests' prompts, so every step mixes decodes with prefill chunks. Reports, per step:
  * wall time, and the GPU busy time from the profiler's kernel records (idle = wall - busy);
  * the host time of each engine phase (schedule, input fill + graph replay launch, sampling
    inputs, sampling + device->host copy, token bookkeeping);
  * the kernels that took the GPU time, summed by name.

    python benchmarks/profile_step.py --model qwen3-0.6b --batch-size 256 --context-len 800
    python benchmarks/profile_step.py --model qwen3-0.6b --batch-size 63 --new-prompt-len 562 --cprofile 25
    python benchmarks/profile_step.py --model qwen3-0.6b --batch-size 16 --new-prompt-len 562 --new-prompts 14 \
        --new-max-tokens 1     # prefill-heavy steps, like the first steps of the throughput run
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mini_infer import SamplingParams
from mini_infer.config import EngineConfig
from mini_infer.engine import LLMEngine


def timed(phases: dict[str, float], name: str, obj: object, attr: str) -> None:
    """Wraps obj.attr so each call adds its host seconds to phases[name]."""
    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - t

    setattr(obj, attr, wrapper)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--context-len", type=int, default=800, help="prompt tokens of each request")
    ap.add_argument("--steps", type=int, default=20, help="decode steps profiled")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    ap.add_argument("--trace", default=None, help="write a chrome trace here")
    ap.add_argument("--output-json", default=None)
    ap.add_argument(
        "--new-prompt-len",
        type=int,
        default=0,
        help="each profiled step also prefills one new request of this many prompt tokens",
    )
    ap.add_argument("--new-prompts", type=int, default=1, help="new requests each profiled step takes")
    ap.add_argument(
        "--new-max-tokens",
        type=int,
        default=0,
        help="output tokens of each new request (0: as many as fit); 1 keeps the decode batch fixed",
    )
    ap.add_argument("--cprofile", type=int, default=0, help="list this many functions by host self-time")
    args = ap.parse_args()

    # room for the requests the mixed steps add (warm-up, timed and profiled steps)
    added_seqs = args.new_prompts if args.new_max_tokens == 1 else args.new_prompts * (3 * args.steps + 10)
    max_num_seqs = args.batch_size + (added_seqs if args.new_prompt_len else 0)
    step_tokens = args.new_prompts * args.new_prompt_len + max_num_seqs
    config = EngineConfig(
        model=args.model,
        load_format="dummy",
        max_model_len=args.max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(8192, step_tokens),
        enforce_eager=args.enforce_eager,
    )
    engine = LLMEngine(config)
    params = SamplingParams(
        temperature=args.temperature,
        ignore_eos=True,
        max_tokens=args.max_model_len - max(args.context_len, args.new_prompt_len),
    )
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    for i in range(args.batch_size):
        ids = torch.randint(0, vocab, (args.context_len,), generator=gen).tolist()
        engine.add_request(str(i), ids, params)
    added = iter(range(args.batch_size, 10**9))

    new_params = (
        params
        if not args.new_max_tokens
        else SamplingParams(temperature=args.temperature, ignore_eos=True, max_tokens=args.new_max_tokens)
    )

    def step() -> None:
        for _ in range(args.new_prompts if args.new_prompt_len else 0):
            ids = torch.randint(0, vocab, (args.new_prompt_len,), generator=gen).tolist()
            engine.add_request(str(next(added)), ids, new_params)
        engine.step()

    while (
        any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(5):  # warm steps
        step()
    sync()

    phases: dict[str, float] = defaultdict(float)
    runner = engine.model_runner
    timed(phases, "schedule", engine.scheduler, "schedule")
    timed(phases, "execute (all)", runner, "execute")
    import mini_infer.worker.model_runner as mr

    timed(phases, "  build_step_inputs", mr, "build_step_inputs")
    timed(phases, "  forward (graph replays, else eager)", runner, "_forward")
    if runner.graphs is not None:
        timed(phases, "    graph inputs + replay launch", runner.graphs, "run")
    timed(phases, "  build_sampling_batch", mr, "build_sampling_batch")
    timed(phases, "  sample_on_device", mr, "sample_on_device")
    timed(phases, "read back (+ wait for GPU) + update", engine, "_update")

    prof_host = cProfile.Profile() if args.cprofile else None
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    plain_ms = (time.perf_counter() - t0) / args.steps * 1e3
    if prof_host is not None:  # a separate pass: cProfile slows the host several-fold
        prof_host.enable()
        for _ in range(args.steps):
            step()
        sync()
        prof_host.disable()
    for k in phases:
        phases[k] = 0.0

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    if args.trace:
        prof.export_chrome_trace(args.trace)

    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    busy = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in ("", None):
            us = e.device_time if hasattr(e, "device_time") else e.cuda_time
            kernels[e.name][0] += us
            kernels[e.name][1] += 1
            busy += us
    n = args.steps
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    print(
        f"\n== {args.model} batch {args.batch_size} context {args.context_len} new prompts {args.new_prompts} x "
        f"{args.new_prompt_len} tokens"
        f" {'eager' if args.enforce_eager else 'cuda graphs'} temperature {args.temperature}"
    )
    print(
        f"step wall {plain_ms:.3f} ms unprofiled, {wall / n * 1e3:.3f} ms profiled; GPU kernels busy "
        f"{busy / n / 1e3:.3f} ms/step, idle {wall / n * 1e3 - busy / n / 1e3:.3f} ms/step"
    )
    print("host phases (ms/step, profiled run):")
    for k, v in phases.items():
        print(f"  {k:34s} {v / n * 1e3:8.3f}")
    print(f"kernels (ms/step, calls/step), top {args.top} of {len(rows)}:")
    for name, (us, calls) in rows[: args.top]:
        print(f"  {us / n / 1e3:8.3f} {calls / n:6.1f}  {name[:110]}")
    if prof_host is not None:
        print(f"host functions by self time over {n} steps (cProfile pass, slowed by the profiler):")
        pstats.Stats(prof_host).sort_stats("tottime").print_stats(args.cprofile)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "step_ms": plain_ms,
                    "profiled_step_ms": wall / n * 1e3,
                    "gpu_busy_ms": busy / n / 1e3,
                    "host_phases_ms": {k: v / n * 1e3 for k, v in phases.items()},
                    "kernels_ms": {k: v[0] / n / 1e3 for k, v in rows},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
