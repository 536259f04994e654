"""`mini-infer disagg-proxy --prefill URL --decode URL`: one OpenAI endpoint in front of a prefill engine
and a decode engine that share KV through a connector (docs/disaggregation.md).

Each completion or chat request goes first to the prefill server with max_tokens 1 (not streamed), so the
prefill engine computes the prompt and its KV connector saves it; then the request as the client sent it
goes to the decode server, which loads that KV instead of computing the prompt, and its answer (streamed
or not) is relayed back byte for byte. An error from the prefill server is the client's answer; if the
prefill server's KV did not arrive, the decode server simply computes the prompt itself.

FastAPI and httpx are imported when the app is built, so `mini-infer --help` stays fast.
"""

import argparse
import contextlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("mini_infer.disagg_proxy")

_PREFILL_DROPS = ("stream", "stream_options", "min_tokens", "max_completion_tokens", "n", "best_of")


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The request the prefill server gets: the same prompt and settings, one token, one sample, no stream
    (the decode server makes every token the client sees, the first included)."""
    prefill = {k: v for k, v in body.items() if k not in _PREFILL_DROPS}
    prefill["max_tokens"] = 1
    return prefill


def build_proxy_app(prefill_url: str, decode_url: str, timeout_s: float | None = None) -> "FastAPI":
    """The proxy's app. (No `from __future__ import annotations` here: FastAPI reads the routes' `Request`
    annotations as objects, and they are imported in this function.)"""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from mini_infer.entrypoints.openai.protocol import error_body

    prefill_url, decode_url = prefill_url.rstrip("/"), decode_url.rstrip("/")
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=10.0), limits=httpx.Limits(max_connections=None)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await client.aclose()

    app = FastAPI(
        title="mini-infer disaggregated prefill/decode proxy", docs_url=None, redoc_url=None, lifespan=lifespan
    )

    def _headers(request: Request) -> dict[str, str]:
        auth = request.headers.get("authorization")
        return {"Authorization": auth} if auth else {}

    def _unreachable(which: str, exc: Exception) -> JSONResponse:
        logger.warning("%s server unreachable: %s", which, exc)
        return JSONResponse(error_body(f"the {which} server is unreachable: {exc}", "server_error"), status_code=502)

    async def _relay(path: str, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse(error_body("malformed JSON body", code="json_invalid"), status_code=400)
        if not isinstance(body, dict):
            return JSONResponse(error_body("the body must be a JSON object"), status_code=400)
        headers = _headers(request)
        try:
            first = await client.post(prefill_url + path, json=prefill_request(body), headers=headers)
        except httpx.HTTPError as exc:
            return _unreachable("prefill", exc)
        if first.status_code != 200:  # a bad request: the prefill server's answer says why
            return Response(first.content, first.status_code, media_type=first.headers.get("content-type"))
        try:
            upstream = await client.send(
                client.build_request("POST", decode_url + path, json=body, headers=headers), stream=True
            )
        except httpx.HTTPError as exc:
            return _unreachable("decode", exc)
        media_type = upstream.headers.get("content-type")
        if not body.get("stream"):
            content = await upstream.aread()
            await upstream.aclose()
            return Response(content, upstream.status_code, media_type=media_type)

        async def chunks():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:  # the client left or the stream ended: the decode server sees the disconnect
                await upstream.aclose()

        return StreamingResponse(chunks(), upstream.status_code, media_type=media_type)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _relay("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _relay("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            r = await client.get(decode_url + "/v1/models", headers=_headers(request))
        except httpx.HTTPError as exc:
            return _unreachable("decode", exc)
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    @app.get("/health")
    async def health() -> Response:
        for url in (prefill_url, decode_url):
            try:
                if (await client.get(url + "/health")).status_code != 200:
                    return Response(status_code=503)
            except httpx.HTTPError:
                return Response(status_code=503)
        return Response(status_code=200)

    return app


# -- the command ------------------------------------------------------------------------------
def add_disagg_proxy_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "disagg-proxy",
        help="one OpenAI endpoint in front of a prefill server and a decode server (KV connector)",
        description="Sends each request to the prefill server with max_tokens 1, then to the decode server, "
        "and relays the decode server's answer (streamed or not).",
    )
    parser.add_argument("--prefill", required=True, help="the prefill server's base URL, e.g. http://127.0.0.1:8100")
    parser.add_argument("--decode", required=True, help="the decode server's base URL, e.g. http://127.0.0.1:8200")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for a backend (default: none)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run_disagg_proxy)
    return parser


def run_disagg_proxy(args: argparse.Namespace) -> int:
    import uvicorn

    from mini_infer.entrypoints.serve_cli import bind_socket

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        raise SystemExit(f"disagg-proxy: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    host, port = sock.getsockname()[:2]
    logger.info("proxy on http://%s:%d: prefill %s, decode %s", host, port, args.prefill, args.decode)
    app = build_proxy_app(args.prefill, args.decode, args.timeout)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])
    return 0
