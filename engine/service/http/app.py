"""The FastAPI application: routes, API key check, and OpenAI-shaped errors for every failure.

    GET  /v1/models            the served model
    POST /v1/completions       text completions (streaming with server-sent events)
    POST /v1/chat/completions  chat completions (streaming with server-sent events)
    GET  /health               200 while serving, 503 while draining or once the engine failed
    GET  /version              {"version": ...}
    GET  /metrics              Prometheus exposition (engine/service/http/prometheus.py)

With an API key, every /v1 route needs `Authorization: Bearer <key>` (401 otherwise); /health,
/version and /metrics stay open, as in vLLM.
"""
from __future__ import annotations

import hmac
import json
import time
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchdeck import __version__
from batchdeck.engine.service.http.errors import OpenAIError, bad_request, engine_dead, error_body, unauthorized
from batchdeck.engine.service.http.prometheus import CONTENT_TYPE_LATEST, ServerMetrics
from batchdeck.engine.service.http.protocol import ChatCompletionRequest, CompletionRequest
from batchdeck.engine.service.http.serving import OpenAIServing


def _error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """The first problem as 'field: what is wrong' and the field's name."""
    if not errors:
        return "the request body is not valid", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if not loc:
        return f"the request body must be a JSON object: {err.get('msg')}", None
    field = loc[0]
    path = field + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    return f"{path}: {err.get('msg')} (got {shown[:80]})", field


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model` whatever the content type says; a 400 naming the problem otherwise."""
    raw = await request.body()
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply to parse") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        message, param = _validation_message(exc.errors())
        raise bad_request(message, param) from None


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (the body is already read, so only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ApiKeyCheck:
    """Plain ASGI middleware (a streamed response passes through untouched): /v1 needs the bearer key."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                await _error_response(unauthorized())(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(serving: OpenAIServing, metrics: ServerMetrics | None, *, api_key: str | None = None,
              model_root: str | None = None) -> FastAPI:
    app = FastAPI(title="batchdeck", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    if api_key:
        app.add_middleware(ApiKeyCheck, key=api_key)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if serving.is_draining():
            return JSONResponse(error_body("draining: the server is shutting down", "server_error"),
                                status_code=503)
        if serving.engine.error is not None:
            return JSONResponse(engine_dead(serving.engine.error).body(), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": serving.model_name, "object": "model", "created": created, "owned_by": "batchdeck",
            "root": model_root or serving.model_name, "parent": None, "max_model_len": serving.max_model_len}]}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        if metrics is None:
            return JSONResponse(error_body("metrics are off"), status_code=404)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = serving.clock()  # the request's arrival on the engine clock, before its body is read
        body = await parse_body(request, CompletionRequest)
        return _respond(await serving.completions(body, lambda: _disconnected(request), arrival))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = serving.clock()
        body = await parse_body(request, ChatCompletionRequest)
        return _respond(await serving.chat(body, lambda: _disconnected(request), arrival))

    return app


def _respond(result: Any) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
