"""The baseline users would write themselves: a gpt-fast-style Llama decode under torch.compile.

    python benchmarks/compiled_decode.py --model llama-3-8b --batch-sizes 1,2,4 \\
        --output benchmarks/results/h200/compiled_decode_llama-3-8b

A plain PyTorch decoder of the preset's shapes with random bf16 weights (the bytes and FLOPs of the real
model), a static KV cache of [batch, kv heads, max length, head dim] written with index_copy_, SDPA over
it with a boolean mask, greedy argmax; the one-token decode step is compiled as gpt-fast compiles it:
`torch.compile(mode="reduce-overhead", fullgraph=True)` with inductor's coordinate-descent tuning. After
a warm-up generation (compiles and graph capture), each batch prefills INPUT_LEN tokens eagerly and
decodes OUTPUT_LEN; the decode steps alone are timed. The roofline is mini-infer's own
(bench/roofline.py: the weights read once per step plus the KV context, at the copy bandwidth measured
here), so its fraction and mini-infer's `bench latency` fraction share a denominator.

Writes OUTPUT.json and OUTPUT.md. `--device cpu --model tiny-llama` runs it eagerly as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mini_infer.bench.roofline import ModelShape, decode_step_cost, measure_hbm_bandwidth
from mini_infer.layers.rotary import rope_parameters
from mini_infer.model_loader import load_hf_config, preset_path


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D] rotated by half-split pairs (Llama's HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, c, batch: int, max_len: int) -> None:
        super().__init__()
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.sizes = [q, kv, kv]
        self.wqkv = nn.Linear(c.hidden_size, q + 2 * kv, bias=False)
        self.wo = nn.Linear(q, c.hidden_size, bias=False)
        self.w1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w3 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        cache_shape = (batch, self.kv_heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape), persistent=False)

    def forward(self, x, cos, sin, mask, pos):
        b, t, _ = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).split(self.sizes, dim=-1)
        q = rope(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rope(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Transformer(nn.Module):
    def __init__(self, c, batch: int, max_len: int) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, batch, max_len) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        head_dim = self.layers[0].head_dim
        inv = 1.0 / (rope_parameters(c)["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids)
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        mask = self.causal[pos][None, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, pos)
        return self.output(self.norm(x[:, -1:]))


def decode_one(model: Transformer, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model(ids, pos).argmax(-1)


def generate(model, step, batch: int, input_len: int, output_len: int, device: str) -> tuple[float, torch.Tensor]:
    """Eager prefill, then output_len decode steps; returns (seconds of the decode steps, tokens)."""
    vocab = model.output.out_features
    prompt = torch.randint(0, vocab, (batch, input_len), device=device)
    with torch.inference_mode():
        tok = model(prompt, torch.arange(input_len, device=device)).argmax(-1)
        out = [tok]
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for i in range(output_len):
            pos = torch.tensor([input_len + i], device=device)
            tok = step(model, tok, pos).clone()  # the graph's output buffer is reused by the next replay
            out.append(tok)
        sync()
    return time.perf_counter() - start, torch.cat(out, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help="an architecture preset (random weights)")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="eager decode (the PyTorch-eager baseline)")
    parser.add_argument("--output", default="benchmarks/results/compiled_decode", help="path stem")
    args = parser.parse_args(argv)
    config = load_hf_config(preset_path(args.model))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    compiled = args.device == "cuda" and not args.no_compile
    if compiled:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True  # gpt-fast's settings
        inductor_config.triton.unique_kernel_names = True
    step = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True) if compiled else decode_one
    bandwidth = measure_hbm_bandwidth() if args.device == "cuda" else None
    shape = ModelShape.from_hf_config(config)
    max_len = args.input_len + args.output_len + 8
    record = {"command": shlex.join(["python", *sys.argv]), "model": args.model, "compiled": compiled,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "copy_bandwidth_bytes_per_s": bandwidth, "results": []}  # fmt: skip
    lines = ["| batch | ms per step | tok/s | % roofline |", "|---|---|---|---|"]
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Transformer(config, batch, max_len).to(dtype)
        for p in model.parameters():
            p.requires_grad_(False)
            p.normal_(0, 0.02)
        generate(model, step, batch, args.input_len, args.output_len, args.device)  # compile + capture
        seconds, _ = generate(model, step, batch, args.input_len, args.output_len, args.device)
        step_s = seconds / args.output_len
        # The mean context over the decode steps, as bench latency counts it.
        contexts = [args.input_len + args.output_len // 2] * batch
        ideal = decode_step_cost(shape, contexts, torch.finfo(dtype).bits // 8).bytes / bandwidth if bandwidth else None
        row = {"batch_size": batch, "step_ms": step_s * 1e3, "tok_per_s": batch / step_s,
               "roofline_fraction": ideal / step_s if ideal else None}  # fmt: skip
        record["results"].append(row)
        pct = f"{100 * row['roofline_fraction']:.1f}%" if ideal else "-"
        lines.append(f"| {batch} | {row['step_ms']:.3f} | {row['tok_per_s']:.1f} | {pct} |")
        print(lines[-1], flush=True)
        del model
        torch._dynamo.reset()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    title = "torch.compile (reduce-overhead)" if compiled else "eager"
    out.with_suffix(".md").write_text(
        f"# gpt-fast-style decode, {title}, {args.model}, {record['device']}\n\n`{record['command']}`\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
