"""`mini-infer generate | serve | bench`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from mini_infer.config import EngineConfig, add_engine_args


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    p.add_argument("--model", default=None,
                   help="model folder, hub id or preset; omitted: the built-in random-weight demo model")
    p.add_argument("--prompt", default="Once upon a time", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_engine_args(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from mini_infer import LLMEngine, SamplingParams

    if args.model is None:
        from mini_infer.demo import demo_model_dir

        print("[no --model: using the built-in demo model, random weights, its text is noise]", file=sys.stderr)
        args.model, args.load_format = demo_model_dir(), "dummy"
    engine = LLMEngine(EngineConfig.from_cli_args(args))
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, stop=args.stop,
        seed=args.seed,
    )
    prompt = args.prompt
    if args.chat:
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True, tokenize=True, return_dict=False)
        prompt = {"prompt_token_ids": list(ids)}
    engine.add_request("cli", prompt, params)
    start, shown, n_tokens = time.perf_counter(), 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown, n_tokens = len(text), len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    print(f"\n[{n_tokens} tokens in {elapsed:.2f}s, {n_tokens / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mini-infer", description="A compact, fast LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    from mini_infer.entrypoints.serve_cli import add_serve_parser

    add_serve_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve").add_subparsers(
        dest="bench_command", required=True)
    from mini_infer.bench import latency, throughput
    from mini_infer.bench.serve import add_bench_serve_parser

    throughput.add_parser(bench)
    latency.add_parser(bench)
    add_bench_serve_parser(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "log_level", None):
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
