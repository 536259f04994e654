"""Speculative decoding on a GPU: what a verify step costs, what the machinery gives at full acceptance,
n-gram drafts on a model with real repetition, and whether greedy tokens stay the same in bf16.

Dummy weights accept drafts at random, so the parts are measured apart (issue 14's benchmark plan):

- verify: the target with exactly k drafts per decoding request every step (the scheduler's proposer is
  replaced by one that repeats the last token k times), step time against a plain decode step of an
  engine without speculation, by batch and k; and the speed-up implied at acceptance rates 0.6-0.8
  (expected tokens per step (1 - a^(k+1)) / (1 - a), divided by the step-cost ratio).
- self_draft: the target as its own draft model (same preset and seed: the same weights), end to end:
  step time against a plain decode step by batch (--proposer-batch-sizes) and k; acceptance near 1 is
  the machinery's ceiling, with the draft costing a full model.
- eagle3: a random EAGLE-3 head of the target's shapes (draft vocabulary 32,000): the cost of a step
  with the head's k proposals against a plain decode step, by batch and k; acceptance at random.

The proposer parts run the target's and the proposer's passes over CUDA graphs (each row says whether
the engine captured them: `graphs`); --proposer-eager runs them eagerly instead, for the comparison.
- ngram: a real model (stories260K) on prompts that repeat themselves: tok/s and acceptance, with and
  without n-gram drafts.
- exact: greedy tokens of 8 requests with forced drafts against the same requests without speculation
  (bf16): the fraction of identical tokens and each request's first divergence.

    python benchmarks/spec_decode.py --model llama-3-8b --stories .gpu/stories260K \\
        --output-json benchmarks/results/h200/spec_decode_llama-3-8b.json
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
from transformers import PretrainedConfig

from mini_infer import LLMEngine, SamplingParams
from mini_infer.bench.common import free_device_memory
from mini_infer.config import EngineConfig
from mini_infer.model_loader import load_hf_config, resolve_model_path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def max_len_for(model: str) -> int:
    """2048 positions, or fewer where the model takes fewer (the CPU smoke run on stories260K)."""
    return min(2048, load_hf_config(resolve_model_path(model, "dummy")).max_position_embeddings)


def engine(model: str, **kwargs) -> LLMEngine:
    free_device_memory()  # the engines the caller dropped (del): each sizes its KV pool from a free GPU
    settings = {"load_format": "dummy", "max_model_len": max_len_for(model), "max_num_seqs": 64, **kwargs}
    return LLMEngine(EngineConfig(model=model, **settings))


def proposer_engine(args, spec: dict) -> LLMEngine:
    """A speculating engine for the proposer parts: as many sequences as the largest batch timed (fewer
    graphs to capture), over CUDA graphs unless --proposer-eager."""
    batch = max(args.proposer_batches)
    return engine(args.model, speculative_config=spec, max_num_seqs=batch, enforce_eager=args.proposer_eager)


def proposer_row(part: str, e: LLMEngine, batch: int, k: int, plain: dict, r: dict) -> dict:
    """A proposer part's row: its step against the plain decode step at the same batch, and the speed-up
    its acceptance gives (tokens per step / step-time ratio)."""
    runner = e.model_runner
    ratio = r["step_ms"] / plain["step_ms"]
    return {
        "part": part,
        "batch": batch,
        "k": k,
        "graphs": runner.graphs is not None and runner.proposer_graphs is not None,
        "decode_step_ms": plain["step_ms"],
        "plain_tok_per_s": plain["tok_per_s"],
        **r,
        "step_over_decode": ratio,
        "speedup": r["tokens_per_step"] / ratio,
        **{f"speedup_at_{a}": expected_speedup(ratio, k, a) for a in (0.6, 0.7, 0.8)},
    }


def force_drafts(e: LLMEngine, k: int) -> None:
    """Every decoding request proposes k drafts (its last token repeated), whatever the method."""
    e.scheduler.propose = lambda seq, room: [seq.token_ids[-1]] * min(k, room)


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def timed_decode(e: LLMEngine, ids: list[list[int]], steps: int, warmup: int = 4) -> dict:
    """Adds the requests, runs their prefills and `warmup` steps, then times `steps` steps (wall clock, the
    device synchronised at both ends) and counts the tokens they emitted."""
    params = SamplingParams(temperature=0, max_tokens=e.max_model_len - max(map(len, ids)) - 1, ignore_eos=True)
    for i, p in enumerate(ids):
        e.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    while any(not s.output_token_ids for s in e.scheduler.running) or e.scheduler.waiting:
        e.step()
    for _ in range(warmup):
        e.step()
    sched = e.scheduler
    tokens0, drafts0, accepted0 = e.stats.generation_tokens, sched.spec_num_draft_tokens, sched.spec_num_accepted_tokens
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        e.step()
    sync()
    seconds = time.perf_counter() - start
    tokens = e.stats.generation_tokens - tokens0
    drafts = sched.spec_num_draft_tokens - drafts0
    e.abort_request([f"r{i}" for i in range(len(ids))])
    while e.has_unfinished_requests():
        e.step()
    return {
        "step_ms": 1e3 * seconds / steps,
        "tok_per_s": tokens / seconds,
        "tokens_per_step": tokens / steps / len(ids),
        "acceptance": (sched.spec_num_accepted_tokens - accepted0) / drafts if drafts else None,
    }


def expected_speedup(ratio: float, k: int, a: float) -> float:
    return (1 - a ** (k + 1)) / (1 - a) / ratio


def part_verify(args, rows: list) -> None:
    base = engine(args.model)
    vocab = base.model_config.vocab_size
    plain = {b: timed_decode(base, prompts(b, args.input_len, vocab), args.steps) for b in args.batches}
    del base
    spec = engine(args.model, speculative_config={"method": "ngram", "num_speculative_tokens": max(args.ks)})
    for b in args.batches:
        for k in args.ks:
            force_drafts(spec, k)
            r = timed_decode(spec, prompts(b, args.input_len, vocab), args.steps)
            ratio = r["step_ms"] / plain[b]["step_ms"]
            rows.append(
                {
                    "part": "verify",
                    "batch": b,
                    "k": k,
                    "decode_step_ms": plain[b]["step_ms"],
                    "verify_step_ms": r["step_ms"],
                    "verify_over_decode": ratio,
                    **{f"speedup_at_{a}": expected_speedup(ratio, k, a) for a in (0.6, 0.7, 0.8)},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    del spec


def plain_decode(args) -> tuple[dict, int]:
    """Plain decode steps at each proposer batch, and the vocabulary size."""
    base = engine(args.model)
    vocab = base.model_config.vocab_size
    plain = {b: timed_decode(base, prompts(b, args.input_len, vocab), args.steps) for b in args.proposer_batches}
    del base
    return plain, vocab


def part_self_draft(args, rows: list) -> None:
    plain, vocab = plain_decode(args)
    for k in (2, 4):
        spec = proposer_engine(args, {"method": "draft_model", "model": args.model, "num_speculative_tokens": k})
        for b in args.proposer_batches:
            r = timed_decode(spec, prompts(b, args.input_len, vocab), max(8, args.steps // (k + 1)))
            rows.append(proposer_row("self_draft", spec, b, k, plain[b], r))
            print(json.dumps(rows[-1]), flush=True)
        del spec


def random_eagle3_head(c: PretrainedConfig, path: Path, draft_vocab: int = 32000) -> None:
    """An EAGLE-3 head for a target of config c, random weights, in the published format."""
    from safetensors.torch import save_file

    draft_vocab = min(draft_vocab, c.vocab_size)
    h, heads, kv, inter = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    d = getattr(c, "head_dim", None) or h // heads
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        **{k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "rms_norm_eps")},
        "num_key_value_heads": kv,
        "head_dim": d,
        "num_hidden_layers": 1,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": draft_vocab,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": getattr(c, "rope_theta", 10000.0),
        "rope_scaling": getattr(c, "rope_scaling", None),
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    tensors = {
        "fc.weight": w(h, 3 * h),
        "midlayer.self_attn.q_proj.weight": w(heads * d, 2 * h),
        "midlayer.self_attn.k_proj.weight": w(kv * d, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv * d, 2 * h),
        "midlayer.self_attn.o_proj.weight": w(h, heads * d),
        "midlayer.mlp.gate_proj.weight": w(inter, h),
        "midlayer.mlp.up_proj.weight": w(inter, h),
        "midlayer.mlp.down_proj.weight": w(h, inter),
        **{
            f"midlayer.{n}.weight": torch.ones(h)
            for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")
        },
        "norm.weight": torch.ones(h),
        "lm_head.weight": w(draft_vocab, h),
        "d2t": torch.zeros(draft_vocab, dtype=torch.int64),
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))


def part_eagle3(args, rows: list) -> None:
    plain, vocab = plain_decode(args)
    with tempfile.TemporaryDirectory() as tmp:
        random_eagle3_head(load_hf_config(resolve_model_path(args.model, "dummy")), Path(tmp))
        for k in (1, 3, 5):
            spec = proposer_engine(args, {"method": "eagle3", "model": tmp, "num_speculative_tokens": k})
            for b in args.proposer_batches:
                r = timed_decode(spec, prompts(b, args.input_len, vocab), args.steps)
                rows.append(proposer_row("eagle3", spec, b, k, plain[b], r))
                print(json.dumps(rows[-1]), flush=True)
            del spec


def part_ngram(args, rows: list) -> None:
    text = "Lily and Tom went to the park. Lily and Tom saw a dog. The dog ran to Lily and Tom. Lily and Tom"
    for k in (0, 3, 5):
        spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": k}} if k else {}
        e = engine(args.stories, load_format="auto", **spec)
        ids = [e.tokenize(text)[1]] * args.ngram_batch
        r = timed_decode(e, ids, 48, warmup=2)
        rows.append({"part": "ngram", "model": "stories260K", "batch": args.ngram_batch, "k": k, **r})
        print(json.dumps(rows[-1]), flush=True)
        del e


def greedy(e: LLMEngine, ids: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for i, p in enumerate(ids):
        e.add_request(f"g{i}", {"prompt_token_ids": p}, params)
    done: dict[str, list[int]] = {}
    while e.has_unfinished_requests():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"g{i}"] for i in range(len(ids))]


def part_exact(args, rows: list) -> None:
    base = engine(args.model)
    ids = [p[: 16 + 24 * i] for i, p in enumerate(prompts(8, 200, base.model_config.vocab_size, seed=1))]
    want = greedy(base, ids, 64)
    del base
    spec = engine(args.model, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    force_drafts(spec, 4)
    got = greedy(spec, ids, 64)
    del spec
    first = [next((j for j, (a, b) in enumerate(zip(w, g)) if a != b), None) for w, g in zip(want, got)]
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g)) / sum(map(len, want))
    rows.append({"part": "exact", "k": 4, "identical_token_fraction": same, "first_divergence": first})
    print(json.dumps(rows[-1]), flush=True)


PARTS = {"verify": part_verify, "self_draft": part_self_draft, "eagle3": part_eagle3, "ngram": part_ngram,
         "exact": part_exact}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--stories", help="a real model folder for the n-gram part (stories260K)")
    parser.add_argument("--parts", default="verify,exact,eagle3,self_draft,ngram")
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument(
        "--ks", default="1,2,3,4,5,7", help="the verify and ngram parts' k (self_draft runs k = 2, 4; eagle3 1, 3, 5)"
    )
    parser.add_argument("--proposer-batch-sizes", default="1,4,16", help="the eagle3 and self_draft parts' batches")
    parser.add_argument("--proposer-eager", action="store_true", help="the proposer parts without CUDA graphs")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--ngram-batch", type=int, default=1)
    parser.add_argument("--decode-num-splits", type=int, help="experiment: one split count at every batch")
    parser.add_argument("--output-json", required=True)
    args = parser.parse_args()
    if args.decode_num_splits:  # the split count then depends on no shape: decode rows round alike
        from mini_infer.kernels import decode_attention as kernel

        config = kernel.DecodeConfig(num_splits=args.decode_num_splits)
        kernel.decode_attention_triton.__defaults__ = (config,)
    args.batches = [int(b) for b in args.batch_sizes.split(",")]
    args.ks = [int(k) for k in args.ks.split(",")]
    args.proposer_batches = [int(b) for b in args.proposer_batch_sizes.split(",")]
    rows: list[dict] = []
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for part in args.parts.split(","):
        if part == "ngram" and not args.stories:
            continue
        start = time.perf_counter()
        try:
            PARTS[part](args, rows)
        finally:  # after each part, and its rows so far when it fails
            out.write_text(json.dumps(record, indent=1))
        print(f"# {part}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
