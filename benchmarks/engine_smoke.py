"""GPU smoke check of the engine: parity with transformers on CUDA, then a first speed probe.

python benchmarks/engine_smoke.py --fixtures DIR   (DIR holds stories260K and tiny-random-qwen3)
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mini_infer import LLM, SamplingParams

PROMPTS = [
    "Once upon a time",
    "The cat sat on the",
    "Lily and Tom went to the park. They saw a big dog.",
    "One day, a little bird",
    "Ben had a red ball.",
    "The sun was hot and",
    "Sara",
    "Tim and his mom",
]


def parity(path: str, backend: str, dtype: str) -> str:
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).cuda().eval()
    llm = LLM(path, dtype=dtype, kernel_backend=backend, max_num_batched_tokens=64)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    same = 0
    for p, o in zip(PROMPTS, outs):
        ids = torch.tensor([tok.encode(p)], device="cuda")
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
        same += ref == o.outputs[0].token_ids
    return f"{path.split('/')[-1]} {backend} {dtype}: {same}/{len(PROMPTS)} identical"


def speed(model: str, batch: int, in_len: int, out_len: int, **kw) -> str:
    llm = LLM(model, load_format="dummy", **kw)
    prompts = [{"prompt_token_ids": [(i * 7 + j) % 1000 + 10 for j in range(in_len)]} for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del llm
    torch.cuda.empty_cache()
    return f"{model} {kw} batch {batch} in {in_len} out {out_len}: {batch * out_len / dt:.1f} out tok/s ({dt:.2f}s)"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--profile", default=None, help="write a cProfile of a Qwen3-0.6B run here")
    args = ap.parse_args()
    lines = []
    if not args.skip_parity:
        for backend in ("triton",):
            lines.append(parity(f"{args.fixtures}/stories260K", backend, "float32"))
            lines.append(parity(f"{args.fixtures}/tiny-random-qwen3", backend, "float32"))
        print("\n".join(lines), flush=True)
    runs = [
        ("llama-3-8b", 1, 128, 128, {}),
        ("llama-3-8b", 1, 128, 128, {"enforce_eager": True}),
        ("llama-3-8b", 64, 256, 128, {}),
        ("qwen3-0.6b", 256, 256, 256, {}),
        ("qwen3-0.6b", 256, 256, 256, {"enforce_eager": True}),
    ]
    for model, batch, inp, outp, kw in [] if args.skip_speed else runs:
        lines.append(speed(model, batch, inp, outp, max_model_len=4096, **kw))
        print(lines[-1], flush=True)
    if args.profile:
        import cProfile
        import pstats

        cProfile.run('speed("qwen3-0.6b", 256, 256, 256, max_model_len=4096)', "/tmp/prof")
        with open(args.profile, "w") as f:
            pstats.Stats("/tmp/prof", stream=f).sort_stats("tottime").print_stats(40)
    print("\n==== summary")
    print("\n".join(lines))
