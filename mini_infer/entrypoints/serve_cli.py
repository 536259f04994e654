"""`mini-infer serve`: the OpenAI-compatible server on FastAPI + uvicorn.

`mini_infer.cli` calls `add_serve_parser(subparsers)`; `python -m mini_infer.entrypoints.serve_cli`
runs the same command on its own.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from mini_infer.config import EngineConfig, add_engine_args

logger = logging.getLogger("mini_infer.serve")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_tag", nargs="?", default=None, help="the model (same as --model)")
    parser.add_argument("--model", default=None, help="a model folder, hub id or preset name")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1 only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 endpoints")
    parser.add_argument(
        "--served-model-name", nargs="+", default=None, help="names the API answers to (default: --model)"
    )
    parser.add_argument(
        "--chat-template", default=None, help="a Jinja chat template file, used instead of the tokenizer's"
    )
    parser.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        help="Host header names accepted ('*' for any); default without --api-key: IP addresses "
        "and localhost only (a defence against DNS rebinding)",
    )
    parser.add_argument(
        "--max-request-body-bytes", type=int, default=None, help="larger request bodies get a 413 (default: 4 MiB)"
    )
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters (PEFT folders) served under these model names; needs --enable-lora",
    )
    parser.add_argument("--enable-fastapi-docs", action="store_true", help="serve /docs and /openapi.json")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--disable-access-log", action="store_true", help="do not log each HTTP request")
    add_engine_args(parser)
    return parser


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__.splitlines()[0]
    )
    add_serve_arguments(parser)
    parser.set_defaults(func=run_serve)
    return parser


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds before the model loads, so a busy port fails fast and port 0 resolves to a real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it a response's body waits behind its headers for the
    # client's delayed ACK: 40 ms more for every request on a kept-alive connection (the openai client's).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mini_infer.async_engine import AsyncLLMEngine
    from mini_infer.entrypoints.openai.api_server import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.model = args.model or args.model_tag
    if not args.model:
        raise SystemExit("serve: give a model, as `--model PATH` or as the first argument")
    chat_template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    if args.max_request_body_bytes is not None and args.max_request_body_bytes < 1:
        raise SystemExit("serve: --max-request-body-bytes must be a positive number of bytes")
    from mini_infer.entrypoints.openai.serving_lora import parse_lora_modules

    try:
        lora_modules = parse_lora_modules(args.lora_modules or [])
    except ValueError as exc:
        raise SystemExit(f"serve: {exc}") from exc
    if lora_modules and not args.enable_lora:
        raise SystemExit("serve: --lora-modules needs --enable-lora")
    config = EngineConfig.from_cli_args(args)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        raise SystemExit(f"serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    host, port = sock.getsockname()[:2]
    engine = AsyncLLMEngine.from_config(config)
    names = args.served_model_name or [args.model]
    limits = {} if args.max_request_body_bytes is None else {"max_request_body_bytes": args.max_request_body_bytes}
    try:
        app = build_app(
            engine,
            names,
            api_key=args.api_key,
            chat_template=chat_template,
            allowed_hosts=args.allowed_hosts,
            enable_docs=args.enable_fastapi_docs,
            lora_modules=lora_modules,
            **limits,
        )
    except ValueError as exc:  # an adapter of --lora-modules that cannot load
        engine.shutdown()
        raise SystemExit(f"serve: {exc}") from exc
    stats = engine.latest_stats
    blocks = getattr(stats, "num_kv_blocks_total", 0)
    url_host = f"[{host}]" if ":" in host else host
    logger.info(
        "serving model %s as %s on http://%s:%d (max_model_len %d, KV pool %d blocks x %d = %d tokens)%s",
        args.model,
        ", ".join(names),
        url_host,
        port,
        engine.max_model_len,
        blocks,
        config.block_size,
        blocks * config.block_size,
        ", API key required" if args.api_key else "",
    )
    uvicorn_config = uvicorn.Config(
        app, log_level=args.log_level, access_log=not args.disable_access_log, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(uvicorn_config)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="mini-infer serve", description=__doc__))
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
