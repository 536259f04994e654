"""`mini-infer generate | serve | disagg-proxy | bench`: the command line.

Building the parsers imports neither torch nor transformers (each command imports what it runs), so
`--help` answers at once. Every user mistake ends in one line on stderr naming what to change, and exit
status 2: argparse's own errors (no abbreviated flags: `--max-token` is an error, not `--max-tokens`), and
the ValueError that config, loading and request checks raise.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
import time


class ArgumentParser(argparse.ArgumentParser):
    """argparse with exact flag names only, and errors in one line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's: usage lines, then the error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a prompt, streamed to the terminal",
        description="Prints the prompt, then streams the generated text after it.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model folder or hub id (org/name); omitted: the built-in demo model, random weights",
    )
    p.add_argument("--prompt", default="Once upon a time", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=-1, help="sample from the k likeliest tokens; -1 is all")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the likeliest")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 is none")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="logging threshold"
    )
    from mini_infer.config import add_engine_args

    add_engine_args(p)
    p.set_defaults(func=run_generate)


def _separator(tokenizer, prompt_ids: list[int], output_ids: list[int], text: str) -> str:
    """The space that joins the echoed prompt to its continuation: a completion's text starts where its
    first token's text does, without the leading space that SentencePiece gives it after the prompt."""
    if tokenizer is None:
        return ""
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=True)
    joined = full[len(prefix) :] if full.startswith(prefix) else text
    return joined[: len(joined) - len(joined.lstrip(" "))] if not text.startswith(" ") else ""


def run_generate(args: argparse.Namespace) -> int:
    from mini_infer import LLMEngine, SamplingParams
    from mini_infer.config import EngineConfig

    if args.model is None:
        from mini_infer.demo import demo_model_dir

        print(
            "[no --model given: this is the built-in demo model. Its weights are random, so its text is random "
            "characters. For real text pass --model with a Hugging Face model folder or hub id.]",
            file=sys.stderr,
        )
        args.model, args.load_format = demo_model_dir(), "dummy"
    engine = LLMEngine(EngineConfig.from_cli_args(args))
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens,
        stop=args.stop,
        seed=args.seed,
    )
    prompt = args.prompt
    if args.chat:
        if engine.tokenizer is None or not engine.tokenizer.chat_template:
            raise ValueError(f"{args.model} has no chat template: leave out --chat, or pick a chat model")
        ids = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        prompt = {"prompt_token_ids": list(ids)}
    engine.add_request("cli", prompt, params)
    sys.stdout.write(args.prompt + ("\n" if args.chat else ""))  # the completion continues the prompt
    sys.stdout.flush()
    start, shown, n_tokens = time.perf_counter(), 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            if not shown and text and not args.chat:
                sys.stdout.write(_separator(engine.tokenizer, out.prompt_token_ids, out.outputs[0].token_ids, text))
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown, n_tokens = len(text), len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    print(f"\n[{n_tokens} tokens in {elapsed:.2f}s, {n_tokens / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def _finish_parsers(parser: argparse.ArgumentParser) -> None:
    """Appends '(default: X)' to the help of every option of this parser and its subcommands that has a
    default worth showing and does not state it already; each command's parser is kept in its namespace
    (`_parser`) so an unknown flag is reported against that command."""
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in commands:
        for sub in action.choices.values():
            _finish_parsers(sub)
    if not commands:
        parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0:
            continue
        if "default" not in (action.help or ""):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="mini-infer", description="A compact, fast LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    from mini_infer.entrypoints.serve_cli import add_serve_parser

    add_serve_parser(sub)
    from mini_infer.entrypoints.disagg_proxy import add_disagg_proxy_parser

    add_disagg_proxy_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve").add_subparsers(
        dest="bench_command", required=True
    )
    from mini_infer.bench import latency, throughput
    from mini_infer.bench.serve import add_bench_serve_parser

    throughput.add_parser(bench)
    latency.add_parser(bench)
    add_bench_serve_parser(bench)
    _finish_parsers(parser)
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    message = "unrecognized arguments: " + " ".join(extra)
    known = [o for a in parser._actions for o in a.option_strings]
    flags = [e.split("=")[0] for e in extra if e.startswith("--")]
    hints = [m[0] for f in flags if (m := difflib.get_close_matches(f, known, n=1, cutoff=0.75))]
    return message + (f"; did you mean {', '.join(hints)}?" if hints else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = getattr(args, "_parser", parser)
        command.error(_unknown_flags(command, extra))
    if getattr(args, "log_level", None):
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except ValueError as e:  # a user mistake: config, model, request or workload checks
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
