"""Multi-LoRA throughput on a GPU: 1, 4, 16 adapters mixed in every batch vs the base model alone.

Issue 18's target: 16 adapters of rank 16 at least 80% of the base model's throughput. Dummy base weights
and random adapters of --rank on every target (q/k/v/o/gate/up/down), written as PEFT folders on the fly;
request i runs adapter i mod N, so each step mixes all N. Every request makes exactly --output-len tokens
(ignore_eos), so the runs do the same work. Rows: the base model on an engine without LoRA, the same on
an engine with enable_lora (the empty slots' cost), then N adapters.

    python benchmarks/lora_throughput.py --model qwen3-8b \\
        --output-json benchmarks/results/h200/lora_throughput_qwen3-8b.json

`--smoke` runs the same code on the CPU with the tiny-llama preset and tiny settings (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mini_infer import LLMEngine, LoRARequest, SamplingParams
from mini_infer.bench.common import free_device_memory, shut_down
from mini_infer.config import EngineConfig
from mini_infer.model_loader import load_hf_config, resolve_model_path

MODULES = {  # PEFT module -> (its parent, input features, output features) from the model's config
    "q_proj": ("self_attn", "hidden", "q"),
    "k_proj": ("self_attn", "hidden", "kv"),
    "v_proj": ("self_attn", "hidden", "kv"),
    "o_proj": ("self_attn", "q", "hidden"),
    "gate_proj": ("mlp", "hidden", "inter"),
    "up_proj": ("mlp", "hidden", "inter"),
    "down_proj": ("mlp", "inter", "hidden"),
}


def write_random_adapter(path: Path, hf_config, rank: int, seed: int) -> str:
    """A PEFT LoRA folder for hf_config's model: random A and B (std chosen so the delta is small but
    nonzero), lora_alpha = 2 * rank."""
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    sizes = {
        "hidden": hf_config.hidden_size,
        "q": heads * head_dim,
        "kv": kv_heads * head_dim,
        "inter": hf_config.intermediate_size,
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for module, (parent, fan_in, fan_out) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, sizes[fan_in], generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(sizes[fan_out], rank, generator=gen) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors")
    )
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES), "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)


def run(engine: LLMEngine, args, loras: list[LoRARequest | None], label: str) -> dict:
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    for i in range(args.num_prompts):
        ids = [rng.randrange(vocab) for _ in range(args.input_len)]
        params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True, output_kind="final_only")
        engine.add_request(f"{label}-{i}", {"prompt_token_ids": ids}, params, lora_request=loras[i % len(loras)])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += sum(len(c.token_ids) for c in out.outputs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    num_adapters = len([lora for lora in loras if lora is not None])
    return {
        "run": label,
        "num_adapters": num_adapters,
        "seconds": seconds,
        "output_tokens": tokens,
        "tok_s": tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b", help="a preset (dummy weights) or a model folder")
    parser.add_argument("--adapters", default="1,4,16", help="adapter counts to mix, comma-separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--output-json", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny-llama, tiny settings (checks the script)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.adapters, args.rank = "tiny-llama", "1,2", 4
        args.num_prompts, args.input_len, args.output_len, args.max_num_seqs = 4, 8, 4, 4
    counts = [int(n) for n in args.adapters.split(",")]
    hf_config = load_hf_config(resolve_model_path(args.model, "dummy"))
    common = dict(
        model=args.model,
        load_format="dummy",
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs,
    )
    warm_prompts = min(max(8, *counts), args.num_prompts)  # one per adapter at least: every slot loaded
    warm = argparse.Namespace(**{**vars(args), "num_prompts": warm_prompts, "output_len": 4})
    rows = []
    engine = LLMEngine(EngineConfig(**common))  # the base model alone, on an engine without LoRA
    run(engine, warm, [None], "warm-up")
    rows.append(run(engine, args, [None], "base"))
    print(json.dumps(rows[-1]), flush=True)
    shut_down(engine)
    del engine
    free_device_memory()  # the LoRA engine sizes its KV pool on what is free
    engine = LLMEngine(EngineConfig(**common, enable_lora=True, max_loras=max(counts), max_lora_rank=args.rank))
    with tempfile.TemporaryDirectory() as tmp:
        loras = [
            LoRARequest(f"lora{i}", i + 1, write_random_adapter(Path(tmp) / f"lora{i}", hf_config, args.rank, i))
            for i in range(max(counts))
        ]
        for lora in loras:
            engine.add_lora(lora)
        run(engine, warm, loras, "warm-up-lora")  # every slot loaded, the LoRA kernels compiled
        rows.append(run(engine, args, [None], "base, enable_lora"))
        print(json.dumps(rows[-1]), flush=True)
        for n in counts:
            rows.append(run(engine, args, loras[:n], f"{n} adapters"))
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["vs_base"] = row["tok_s"] / rows[0]["tok_s"]
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "rank": args.rank,
        "smoke": args.smoke,
        "rows": rows,
    }
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    lines = [f"# Multi-LoRA throughput ({args.model}, rank {args.rank})", "", f"`{record['command']}`", ""]
    lines += ["| run | tok/s | vs base |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['tok_s']:.0f} | {r['vs_base']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    shut_down(engine)


if __name__ == "__main__":
    main()
