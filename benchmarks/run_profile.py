"""The Qwen3-0.6B throughput run, instrumented: the Triton compiles during the run (step, kernel, ms, key),
then the prefill phase (first 18 steps) of runs with other prompts under the torch profiler and cProfile.
A diagnosis script (it wraps Triton's private JITFunction._do_compile); the benchmark itself now reports
compiles through Triton's public hook (`triton_compiles_during_run`).

    PYTHONPATH=. python benchmarks/run_profile.py
"""

import cProfile
import pstats
import time
from collections import defaultdict

import torch
import triton.runtime.jit as tj
from torch.profiler import ProfilerActivity, profile

from mini_infer import LLMEngine, SamplingParams
from mini_infer.bench.throughput import make_workload, warm_up_engine
from mini_infer.config import EngineConfig

engine = LLMEngine(EngineConfig(model="qwen3-0.6b", load_format="dummy", max_model_len=4096))
wl = make_workload(256, engine.model_config.vocab_size, seed=0)
warm_up_engine(engine, wl)
compiles = []
step_no = [-1]
orig = tj.JITFunction._do_compile


def hooked(self, key, signature, device, constexprs, options, attrs, warmup):
    t = time.perf_counter()
    r = orig(self, key, signature, device, constexprs, options, attrs, warmup)
    torch.cuda.synchronize()
    compiles.append((step_no[0], self.__name__, round((time.perf_counter() - t) * 1e3, 1), str(key)[:160]))
    return r


tj.JITFunction._do_compile = hooked


def add(tag, seed=0):
    w = make_workload(256, engine.model_config.vocab_size, seed=seed)  # other seeds: no prefix-cache hits
    for i, (p, o) in enumerate(zip(w.prompts, w.output_lens)):
        engine.add_request(
            f"{tag}{i}",
            {"prompt_token_ids": p},
            SamplingParams(temperature=0.6, max_tokens=o, ignore_eos=True, output_kind="final_only"),
        )


add("a")
t0 = time.perf_counter()
while engine.has_unfinished_requests():
    step_no[0] += 1
    engine.step()
torch.cuda.synchronize()
print(f"run A {time.perf_counter() - t0:.3f} s, {step_no[0] + 1} steps; compiles during the run: {len(compiles)}")
for c in compiles:
    print("  step", c)

# run B: the first 18 steps under the torch profiler
add("b", 1)
n0 = len(engine.step_timings)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter()
    for _ in range(18):
        engine.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
kernels = defaultdict(lambda: [0.0, 0])
busy = 0.0
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        kernels[e.name][0] += us
        kernels[e.name][1] += 1
        busy += us
print(f"\nrun B first 18 steps (profiled): wall {wall * 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms")
for t in engine.step_timings[n0:]:
    print("  ", t)
for name, (us, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
    print(f"  {us / 1e3:8.2f} ms {c:6d}  {name[:100]}")
engine.abort_request([f"b{i}" for i in range(256)])
while engine.has_unfinished_requests():
    engine.step()
# run C: the same 18 steps, unprofiled, then under cProfile
for tag, seed, prof_host in (("c", 2, None), ("d", 3, cProfile.Profile())):
    add(tag, seed)
    torch.cuda.synchronize()
    n0 = len(engine.step_timings)
    t0 = time.perf_counter()
    if prof_host:
        prof_host.enable()
    for _ in range(18):
        engine.step()
    torch.cuda.synchronize()
    if prof_host:
        prof_host.disable()
    print(
        f"\nrun {tag}: 18 steps {1e3 * (time.perf_counter() - t0):.1f} ms; host ms",
        [round(t.host_seconds * 1e3, 1) for t in engine.step_timings[n0:]],
        "gpu ms",
        [round((t.gpu_seconds or 0) * 1e3, 1) for t in engine.step_timings[n0:]],
    )
    engine.abort_request([f"{tag}{i}" for i in range(256)])
    while engine.has_unfinished_requests():
        engine.step()
pstats.Stats(prof_host).sort_stats("tottime").print_stats(30)
