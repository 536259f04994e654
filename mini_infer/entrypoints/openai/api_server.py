"""The FastAPI app: routes, the API key, Host and body-size checks, and OpenAI-shaped errors for every failure."""

from __future__ import annotations

import ipaddress
import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

import mini_infer
from mini_infer.async_engine import AsyncLLMEngine
from mini_infer.entrypoints.openai.metrics import ServerMetrics
from mini_infer.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    error_body,
    internal_error,
    now_s,
)
from mini_infer.entrypoints.openai.serving_chat import OpenAIServingChat
from mini_infer.entrypoints.openai.serving_completion import OpenAIServingCompletion
from mini_infer.entrypoints.openai.serving_lora import LoadLoRAAdapterRequest, ServingLoRAs, UnloadLoRAAdapterRequest

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    503: "server_error",
}
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * 2**20


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """(message, param, code) for pydantic's list of errors; malformed JSON gets its own code."""
    errors = exc.errors()
    parts, param, code = [], None, None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            code = "json_invalid"
            parts.append(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        if not loc and err.get("type") == "value_error":  # a check of the whole body: "field: why"
            message = str(err.get("ctx", {}).get("error", err.get("msg")))
            name = message.split(":", 1)[0]
            if param is None and name.isidentifier():
                param = name
            parts.append(message)
            continue
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param, code


def _too_large_response(limit: int) -> JSONResponse:
    body = error_body(f"the request body exceeds {limit} bytes (--max-request-body-bytes)", code="body_too_large")
    return JSONResponse(body, status_code=413)


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`: at once from Content-Length, else as the body arrives
    (it is buffered up to the limit and handed on whole), so a huge body is neither kept nor parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await _too_large_response(self.max_bytes)(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server stops at Content-Length
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _too_large_response(self.max_bytes)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], receive: Receive) -> Receive:
    """A receive() that gives `messages` first, then reads on (a disconnect, later)."""
    queue = list(messages)

    async def replayed() -> dict:
        return queue.pop(0) if queue else await receive()

    return replayed


def host_allowed(host_header: str, allowed_hosts: list[str] | None) -> bool:
    """With no list: IP addresses and localhost, which DNS rebinding cannot forge (it needs a domain name
    of the attacker's that resolves to this machine). With a list: only its names; '*' allows any."""
    host = host_header.rsplit("]", 1)[0].lstrip("[") if host_header.startswith("[") else host_header.split(":")[0]
    host = host.lower().rstrip(".")
    if allowed_hosts is not None:
        return "*" in allowed_hosts or host in {h.lower() for h in allowed_hosts}
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class HostCheckMiddleware:
    """A defence against DNS rebinding: a request whose Host header names another site is refused."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str] | None) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            if not host_allowed(host, self.allowed_hosts):
                body = error_body(
                    f"Host {host!r} is not allowed; start the server with --allowed-hosts NAME",
                    "permission_error",
                    code="host_not_allowed",
                )
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class APIKeyMiddleware:
    """Answers 401 to /v1 requests without `Authorization: Bearer KEY`, before the body is read.

    A plain ASGI middleware (not BaseHTTPMiddleware), so streaming and disconnects pass untouched.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key):
                body = error_body(
                    "missing or wrong API key; send it as `Authorization: Bearer KEY`",
                    "authentication_error",
                    code="invalid_api_key",
                )
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: AsyncLLMEngine,
    served_model_names: list[str],
    api_key: str | None = None,
    chat_template: str | None = None,
    metrics: ServerMetrics | None = None,
    allowed_hosts: list[str] | None = None,
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
    enable_docs: bool = False,
    lora_modules: list[tuple[str, str]] | None = None,
) -> FastAPI:
    """An app that serves `engine` as `served_model_names` (the first is the default, and the only name
    the API and /metrics show). Without an API key, the Host header is checked (`host_allowed`).
    lora_modules: (name, path) of LoRA adapters to register now (an engine with enable_lora); with
    enable_lora the app also takes adapters at run time (/v1/load_lora_adapter, /v1/unload_lora_adapter)."""
    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="mini-infer OpenAI-compatible server", version=getattr(mini_infer, "__version__", ""), **docs)
    enable_lora = bool(getattr(engine.config, "enable_lora", False))
    if lora_modules and not enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    loras = ServingLoRAs(engine, served_model_names) if enable_lora else None
    for name, path in lora_modules or []:
        loras.register_at_startup(name, path)
    completion = OpenAIServingCompletion(engine, served_model_names, loras)
    chat = OpenAIServingChat(engine, served_model_names, chat_template, loras)
    metrics = metrics or ServerMetrics(served_model_names[0], lambda: engine.latest_stats, engine.max_model_len)
    if engine.observer is None:
        engine.observer = metrics
    app.state.engine = engine
    app.state.metrics = metrics
    created = now_s()

    # Added last runs first: the Host check, then the API key, then the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_body_bytes)
    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    if api_key is None or allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return JSONResponse(error_body(message, param=param, code=code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(str(exc.detail), _TYPE_BY_STATUS.get(exc.status_code, "invalid_request_error"))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(internal_error().body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.healthy else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": getattr(mini_infer, "__version__", "unknown")}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        root = served_model_names[0]  # not the model's path: that stays on the server
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "mini-infer",
                "root": root,
                "parent": None,
                "max_model_len": engine.max_model_len,
            }
            for name in served_model_names
        ]
        for name in loras.by_name if loras is not None else []:  # vLLM's shape: the adapter's parent is the base
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "mini-infer",
                    "root": name,  # not the adapter's path: that stays on the server
                    "parent": root,
                    "max_model_len": engine.max_model_len,
                }
            )
        return {"object": "list", "data": data}

    if loras is not None:

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
            return PlainTextResponse(await loras.load(request))

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
            return PlainTextResponse(await loras.unload(request))

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await chat.create_chat_completion(request, raw_request)

    return app
