"""The OpenAI-compatible HTTP door's routes: /v1/completions, /v1/chat/completions (with server-sent
events), /v1/models, /health and /metrics, on the same GenerationService as the gRPC door;
/v1/models/{id} (the model's shape) and /tokenize for the attention explorer page at /.

Bodies are checked by openai_schema (types) and the shared validation (ranges); what goes back,
errors included, is written by openai_writers in the OpenAI shapes.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from attnserve.server.api.errors import ErrorKind, ServiceError
from attnserve.server.api.openai_schema import ChatBody, ChatMessageBody, CompletionBody
from attnserve.server.api.openai_writers import (
    ChatCompletion,
    Shape,
    TextCompletion,
    error_response,
    model_card,
    service_error_response,
    sse_events,
    whole_body,
)
from attnserve.server.api.records import Prompt
from attnserve.server.api.serving import GenerationService

TIMEOUT_HEADER = "x-request-timeout"  # seconds: the request's deadline (504 past it), like gRPC's


@dataclass
class HttpDoor:
    """What the routes need from the process: the service, health, metrics and the auth token."""

    service: GenerationService
    is_serving: Callable[[], bool]
    registry: CollectorRegistry
    token: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class BodyLimit:
    """Refuses a request body over ``max_bytes`` (413) without reading past the limit: the HTTP
    twin of gRPC's --max-message-bytes. It reads the body itself (every route reads it whole
    anyway), then hands it on; responses, streams included, pass untouched."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its request
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                text = f"the request body is larger than {self.max_bytes:,} bytes (--max-message-bytes)"
                await error_response(413, text, code="request_too_large")(scope, receive, send)
                return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()  # later reads: disconnect detection
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(door: HttpDoor, *, explorer: bool = True) -> FastAPI:
    """The HTTP door's routes; ``explorer``: also serve the attention explorer page at / (--no-explorer)."""
    app = FastAPI(title="attnserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.add_middleware(BodyLimit, max_bytes=door.service.limits.max_request_bytes)
    _refusals_in_openai_shape(app)
    _bearer_token(app, door.token)
    _routes(app, door)
    if explorer:
        from attnserve.server.api.explorer import add_explorer_routes

        add_explorer_routes(app)
    return app


def _refusals_in_openai_shape(app: FastAPI) -> None:
    """FastAPI's own refusals (bodies of the wrong types, unparsable bodies, unknown routes) answer
    in the OpenAI error shape like every other error."""

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            detail = (first.get("ctx") or {}).get("error", first["msg"])
            return error_response(400, f"the body is not valid JSON: {detail} (at character {first['loc'][-1]})")
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return error_response(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Every other refusal FastAPI makes, in the OpenAI error shape too: unknown routes and
        methods, and bodies it cannot parse (not UTF-8, or JSON nested past Python's recursion limit)."""
        message = str(exc.detail)
        if message == "There was an error parsing the body":
            message = "the body could not be parsed: send UTF-8 JSON nested at most a few hundred levels deep"
        return error_response(
            exc.status_code, message, code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        )


def _bearer_token(app: FastAPI, token: str | None) -> None:
    """With --auth-token-file, every /v1/ route asks for the token (/tokenize checks it itself)."""

    @app.middleware("http")
    async def bearer_token(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if token and request.url.path.startswith("/v1/") and not _bearer_matches(request, token):
            return error_response(
                401, "missing or wrong API key: send 'Authorization: Bearer <token>'", code="invalid_api_key"
            )
        return await call_next(request)


def _routes(app: FastAPI, door: HttpDoor) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if door.is_serving() else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(door.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            info = door.service.info()
        except ServiceError as error:
            return service_error_response(error)
        card = {
            "id": info.model_name,
            "object": "model",
            "created": door.created,
            "owned_by": "attnserve",
            "batch_invariant": info.batch_invariant,  # extension: see GetServerInfo.determinism
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        return await _generate(door, body, request, TextCompletion(door.service, body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        return await _generate(door, body, request, ChatCompletion(door.service, body))

    # What the explorer page needs besides generation (any client may use them): the model's
    # shape (GetModelInfo's fields) and the tokens of a prompt (gRPC Tokenize).
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        return _model(door, model_id)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody, request: Request) -> Response:
        if door.token and not _bearer_matches(request, door.token):  # outside /v1/: the middleware skips it
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <token>'")
        return await _tokenize(door, body)


class TokenizeBody(BaseModel):
    """POST /tokenize: one of a prompt (encoded as /v1/completions would) or messages (the chat template)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[ChatMessageBody] | None = None


def _model(door: HttpDoor, model_id: str) -> Response:
    try:
        info = door.service.info()
    except ServiceError as error:
        return service_error_response(error)
    if model_id != info.model_name and model_id not in info.model_aliases:
        message = f"model {model_id!r} is not served here (this server serves {info.model_name!r})"
        return error_response(404, message, param="model", code="model_not_found")
    return JSONResponse(model_card(info, door.created))


async def _tokenize(door: HttpDoor, body: TokenizeBody) -> Response:
    if (body.prompt is None) == (body.messages is None):
        return error_response(400, "send one of prompt or messages", param="prompt")
    if body.prompt is not None:
        prompt = Prompt("prompt", text=body.prompt)
    else:
        turns = [m.turn() for m in body.messages or ()]
        prompt = Prompt("messages", messages=tuple(turns))
    try:
        door.service.info()  # 503 while the model loads, as generation answers
        ids = await door.service.tokenize(prompt)
    except ServiceError as error:
        return service_error_response(error)
    return JSONResponse({"tokens": door.service.token_texts(ids), "token_ids": ids, "count": len(ids)})


def _bearer_matches(request: Request, token: str) -> bool:
    sent = request.headers.get("authorization", "").encode()
    return hmac.compare_digest(sent, f"Bearer {token}".encode())


# ------------------------------------------------------------------ serving
async def _generate(door: HttpDoor, body: CompletionBody | ChatBody, request: Request, shape: Shape) -> Response:
    converted = body.to_request()
    if isinstance(converted, list):
        return service_error_response(ServiceError(ErrorKind.INVALID_ARGUMENT, "", converted), shape.rename)
    try:
        timeout = _timeout(request)
        shape.model = door.service.info().model_name
    except ServiceError as error:
        return service_error_response(error)
    deltas = door.service.generate(converted, timeout_s=timeout, whole_response=not body.stream)
    try:
        first = await anext(deltas)  # validation and admission happen here: their errors get a status
    except ServiceError as error:
        return service_error_response(error, shape.rename)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _ClosingStreamingResponse(
            sse_events(shape, first, deltas, include_usage), media_type="text/event-stream"
        )
    try:
        return JSONResponse(await whole_body(shape, first, deltas))
    except ServiceError as error:
        return service_error_response(error, shape.rename)


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body when the response ends however it ends (a client that hung up included),
    so the request is aborted at once rather than when the generator is collected."""

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def _timeout(request: Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, f"{TIMEOUT_HEADER}: {raw!r} is not a positive number of seconds")
    return seconds
