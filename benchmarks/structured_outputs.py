"""Structured outputs' overhead on a GPU: throughput with a fraction of the requests constrained vs none.

Issue 18's target: 50% constrained requests at most 5% slower than none. Every request makes exactly
--output-len tokens (ignore_eos), so the runs do the same work; the constrained ones carry a grammar
(any JSON object, or the --spec given), so each step fills their bitmask on the host, applies it on the
device; the host fills the masks while the step's forward pass runs (the engine reads the step before
back first: a mask needs every earlier token).
Dummy weights; the tokenizer (a real one is needed to compile grammars) comes from --tokenizer, and
prompts are random token ids. Needs xgrammar on the machine (pip install 'mini-infer[structured]').

    python benchmarks/structured_outputs.py --model qwen3-8b --tokenizer .gpu/tiny-random-qwen3 \\
        --output-json benchmarks/results/h200/structured_outputs_qwen3-8b.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from mini_infer import LLMEngine, SamplingParams, StructuredOutputsParams
from mini_infer.bench.common import shut_down
from mini_infer.config import EngineConfig

SPECS = {
    "json_object": StructuredOutputsParams(json_object=True),
    "regex": StructuredOutputsParams(regex=r"[a-z ]{1,4000}"),
    "json_schema": StructuredOutputsParams(
        json={"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}}}}
    ),
}


def run(engine: LLMEngine, args, fraction: float, spec: StructuredOutputsParams) -> dict:
    rng = random.Random(0)
    vocab = min(engine.model_config.vocab_size, len(engine.tokenizer))
    num_constrained = round(args.num_prompts * fraction)
    for i in range(args.num_prompts):
        ids = [rng.randrange(vocab) for _ in range(args.input_len)]
        params = SamplingParams(
            temperature=1.0,
            max_tokens=args.output_len,
            ignore_eos=True,
            structured_outputs=spec if i < num_constrained else None,
            output_kind="final_only",
        )
        engine.add_request(f"r{fraction}-{i}", {"prompt_token_ids": ids}, params)
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
    return {"constrained_fraction": fraction, "seconds": seconds, "output_tokens": tokens, "tok_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--tokenizer", required=True, help="a folder with a Hugging Face tokenizer")
    parser.add_argument("--spec", choices=sorted(SPECS), default="json_object")
    parser.add_argument("--fractions", default="0,0.5,1")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--output-json", required=True)
    args = parser.parse_args()
    config = EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        load_format="dummy",
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=args.max_num_seqs,
    )
    engine = LLMEngine(config)
    spec = SPECS[args.spec]
    engine.check_structured_outputs(SamplingParams(structured_outputs=spec))  # compile outside the timing
    run(engine, argparse.Namespace(**{**vars(args), "num_prompts": 8, "output_len": 16}), 0.5, spec)  # warm-up
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        rows.append(run(engine, args, fraction, spec))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["tok_s"] if rows and rows[0]["constrained_fraction"] == 0 else None
    for row in rows:
        row["vs_none"] = row["tok_s"] / base if base else None
    record = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "spec": args.spec,
        "rows": rows,
    }
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    lines = [f"# Structured outputs overhead ({args.model}, {args.spec})", "", f"`{record['command']}`", ""]
    lines += ["| constrained | tok/s | vs none |", "|---|---|---|"]
    lines += [f"| {r['constrained_fraction']:.0%} | {r['tok_s']:.0f} | {r['vs_none'] or 0:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    shut_down(engine)


if __name__ == "__main__":
    main()
