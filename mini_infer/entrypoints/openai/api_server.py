"""The FastAPI app: routes, the API key check and OpenAI-shaped errors for every failure."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
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
    now_s,
)
from mini_infer.entrypoints.openai.serving_chat import OpenAIServingChat
from mini_infer.entrypoints.openai.serving_completion import OpenAIServingCompletion

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                   503: "server_error"}


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
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param, code


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
                body = error_body("missing or wrong API key; send it as `Authorization: Bearer KEY`",
                                  "authentication_error", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLMEngine, served_model_names: list[str], api_key: str | None = None,
              chat_template: str | None = None, metrics: ServerMetrics | None = None) -> FastAPI:
    """An app that serves `engine` as `served_model_names` (the first is the default)."""
    app = FastAPI(title="mini-infer OpenAI-compatible server", version=getattr(mini_infer, "__version__", ""))
    completion = OpenAIServingCompletion(engine, served_model_names)
    chat = OpenAIServingChat(engine, served_model_names, chat_template)
    metrics = metrics or ServerMetrics(served_model_names[0], lambda: engine.latest_stats)
    if engine.observer is None:
        engine.observer = metrics
    app.state.engine = engine
    app.state.metrics = metrics
    created = now_s()

    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

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
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {exc!r}", "server_error"), status_code=500)

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
        root = getattr(engine.config, "model", served_model_names[0])
        data = [{"id": name, "object": "model", "created": created, "owned_by": "mini-infer", "root": root,
                 "parent": None, "max_model_len": engine.max_model_len} for name in served_model_names]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await chat.create_chat_completion(request, raw_request)

    return app
