"""The FastAPI app: OpenAI's /v1 endpoints over one shared AsyncEngine, plus /health and /metrics.

Order of checks for a /v1 request: API key (401), model loaded (503) and body size (413, before
the body is read) in an ASGI gate before any routing; then the body (400, OpenAI's error shape,
never an echo of the input), the model name (404), the prompt against the context (400; the
prompt is rendered and tokenized in a worker thread, and an oversized one is refused as soon as
its first pieces pass the limit) and the engine's own validation and queue bound (400 / 429)
before anything is queued. Every error body is {"error": {message, type, param,
code}}; an unexpected exception is a logged 500 in the same shape.
"""
from __future__ import annotations

import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitfold.config import EngineConfig
from bitfold.engine import LLMEngine
from bitfold.errors import BitfoldError
from bitfold.server.async_engine import AsyncEngine, EngineUnavailableError
from bitfold.server.cli import DEFAULT_KEEPALIVE_S, DEFAULT_MAX_REQUEST_BYTES
from bitfold.server.generate import generate
from bitfold.server.http_errors import APIError, api_error, error_response, validation_error
from bitfold.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse

log = logging.getLogger("bitfold")

# Prompts are tokenized in worker threads through the tokenizers library's batch call, which
# releases the GIL; leaving its own thread pool off (one text per call gains nothing from it)
# also keeps it from warning in every child process forked later.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}

# What each route may answer besides 200, for the OpenAPI schema (all in OpenAI's error shape).
_ERRORS = {400: "Invalid JSON or parameter values; `context_length_exceeded` when prompt + max_tokens do not fit",
           401: "Missing or wrong API key (with --api-key)", 404: "Unknown model",
           413: "Request body larger than --max-request-bytes", 429: "The waiting queue is full (--max-queue)",
           503: "The model is loading, failed to load, or the server is shutting down"}


def _responses(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}


def model_name_for(path: str) -> str:
    """The default served name: the model file or folder's name (`.gguf` dropped)."""
    name = os.path.basename(os.path.normpath(path))
    return name[:-5] if name.endswith(".gguf") else name


class ServerState:
    """What the routes share: the engine, the served name, the API key, the request limits and
    the threads that tokenize prompts (off the event loop: a long prompt takes seconds; two, so
    one long prompt does not hold up the short ones, and no more, so a burst of long prompts
    cannot take every core and their memory at once)."""

    def __init__(self, engine: AsyncEngine, model_name: str | None, api_key: str | None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, keepalive_s: float = DEFAULT_KEEPALIVE_S):
        self.engine, self._model_name, self.api_key = engine, model_name, api_key
        self.max_request_bytes, self.keepalive_s = max_request_bytes, keepalive_s
        self.tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bitfold-tokenize")
        self.created = int(time.time())

    @property
    def model_name(self) -> str:
        if self._model_name is None:
            self._model_name = model_name_for(self.engine.check_ready().model_path)
        return self._model_name

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.model_name}`).",
                           param="model", code="model_not_found")


class _Gate:
    """Pure ASGI middleware (streaming responses pass through untouched): counts every request
    by endpoint and status, and answers /v1 requests 401 without the API key and 503 while the
    model is not ready."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            err = self._check(scope) if path.startswith("/v1") else None
            if err is None and scope["method"] == "POST":
                err, receive = await self._limit_body(scope, receive)
            if err is not None:
                await error_response(err)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            endpoint = (path if path in _ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/")
                        else "other")  # a bounded set of label values
            self.state.engine.metrics.http_requests.inc(endpoint=endpoint, code=str(status[0]))

    async def _limit_body(self, scope, receive):
        """(413 error or None, the receive to hand on). A declared Content-Length over the limit
        is refused before anything is read; a chunked body is read here up to the limit and
        replayed. The refused body is read and dropped (up to DRAIN_BYTES) so that the client,
        still sending, gets to read the 413 instead of a reset connection (unless it waits for
        `100 Continue` before sending, which reading would grant)."""
        limit = self.state.max_request_bytes
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if int(length) <= limit:  # the HTTP layer keeps the body to its declared length
                return None, receive
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive, DRAIN_BYTES)
            return _too_large(limit, f"{int(length)} bytes"), receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return None, _replay([message], receive)
            chunks.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, DRAIN_BYTES)
                return _too_large(limit, f"more than {limit} bytes"), receive
            if not message.get("more_body", False):
                return None, _replay(chunks, receive)

    def _check(self, scope) -> APIError | None:
        key = self.state.api_key
        if key is not None:
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                return APIError(401, "Incorrect or missing API key: pass it as 'Authorization: Bearer <key>'.",
                                code="invalid_api_key")
        try:
            self.state.engine.check_ready()
        except EngineUnavailableError as e:
            return api_error(e)
        return None


DRAIN_BYTES = 64 * 1024 * 1024  # most of a refused body read (and dropped) before answering 413


async def _drain(receive, most: int) -> None:
    seen = 0
    while seen <= most:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _replay(messages: list[dict], receive):
    """A receive that hands out `messages` first (a body read ahead), then the real ones."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


def _too_large(limit: int, size: str) -> APIError:
    return APIError(413, f"the request body ({size}) exceeds this server's limit of {limit} bytes "
                         "(--max-request-bytes)", code="request_too_large")


def create_app(engine_or_config: LLMEngine | EngineConfig | AsyncEngine | Callable[[], LLMEngine], *,
               model_name: str | None = None, api_key: str | None = None, max_queue: int = 1024,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, keepalive_s: float = DEFAULT_KEEPALIVE_S) -> FastAPI:
    """The app. An EngineConfig (or a callable returning an LLMEngine) is loaded in the engine
    thread once the app starts, and requests get 503 until it is ready; an LLMEngine is served
    as is. `model_name` is what clients pass as `model` (default: the model file's name).
    `max_request_bytes` bounds a request body (413 beyond); a stream with nothing to send gets
    an SSE comment every `keepalive_s` seconds."""
    if isinstance(engine_or_config, AsyncEngine):
        engine = engine_or_config
    else:
        if isinstance(engine_or_config, LLMEngine):
            loaded = engine_or_config
            load = lambda: loaded  # noqa: E731
        elif isinstance(engine_or_config, EngineConfig):
            config = engine_or_config
            load = lambda: LLMEngine(config)  # noqa: E731
        else:
            load = engine_or_config
        engine = AsyncEngine(load, max_queue=max_queue)
    state = ServerState(engine, model_name, api_key, max_request_bytes, keepalive_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown()
            state.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="bitfold", summary="OpenAI-compatible completions and chat completions", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, message, code=code, headers=exc.headers))  # 405: Allow

    @app.exception_handler(APIError)
    @app.exception_handler(BitfoldError)
    async def _known(request: Request, exc: Exception):
        return error_response(api_error(exc))

    @app.exception_handler(Exception)  # a bug: still OpenAI's shape (Starlette then re-raises it to be logged)
    async def _any(request: Request, exc: Exception):
        return error_response(api_error(exc))

    @app.post("/v1/completions", response_model=None, responses=_responses(400, 401, 404, 413, 429, 503))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            return await generate(state, body, request, chat=False)
        except Exception as e:
            return error_response(api_error(e))

    @app.post("/v1/chat/completions", response_model=None, responses=_responses(400, 401, 404, 413, 429, 503))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        try:
            return await generate(state, body, request, chat=True)
        except Exception as e:
            return error_response(api_error(e))

    def _card() -> dict:
        eng = engine.check_ready()
        # `root` is the model's name, not its path: clients have no business with the server's files.
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "bitfold",
                "root": model_name_for(eng.model_path), "max_model_len": eng.max_model_len}

    @app.get("/v1/models", responses=_responses(401, 503))
    async def models() -> dict:
        return {"object": "list", "data": [_card()]}

    @app.get("/v1/models/{model:path}", responses=_responses(401, 404, 503))
    async def model(model: str) -> dict:
        state.check_model(model)
        return _card()

    @app.get("/health", responses=_responses(503))
    async def health() -> Response:
        try:
            engine.check_ready()
        except EngineUnavailableError as e:
            return error_response(api_error(e))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(engine.metrics.render(engine.stats, engine.ready),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def openapi() -> dict:
        """FastAPI's schema without the 422 it declares for every route with a body: bitfold
        answers validation errors with 400 in OpenAI's shape, never 422."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
