"""The OpenAI-compatible HTTP door: /v1/completions, /v1/chat/completions (with server-sent
events), /v1/models, /health and /metrics, on the same GenerationService as the gRPC door;
/v1/models/{id} (the model's shape) and /tokenize for the attention explorer page at /.

Bodies are checked by openai_schema (types) and the shared validation (ranges); outputs are
written in the OpenAI shapes; errors are {"error": {"message", "type", "param", "code"}} with
the status an OpenAI client expects.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
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
from attnserve.server.api.serving import CompletionDelta, GenerationService
from attnserve.server.api.tools import CallDelta, ToolCallParser, parse_whole
from attnserve.server.api.validation import Prompt
from attnserve.server.engine.outputs import RequestOutput
from attnserve.server.engine.records import AttentionRow, EngineInfo, LensRow, ResidualRow, TokenLogprobs

HTTP_STATUS = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.ALREADY_EXISTS: 409,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.ABORTED: 409,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.INTERNAL: 500,
}
TIMEOUT_HEADER = "x-request-timeout"  # seconds: the request's deadline (504 past it), like gRPC's


@dataclass
class HttpDoor:
    """What the routes need from the process: the service, health, metrics and the auth token."""

    service: GenerationService
    is_serving: Callable[[], bool]
    registry: CollectorRegistry
    token: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    retry = {"Retry-After": "1"} if status in (429, 503) else None  # full queue, draining: try again shortly
    return JSONResponse(body, status_code=status, headers=retry)


def service_error_response(error: ServiceError, rename: Callable[[str], str] = lambda f: f) -> JSONResponse:
    errors = error.field_errors
    if errors and errors[0].field == "model":  # an unknown model is a 404 in the OpenAI API
        return error_response(404, errors[0].message, param="model", code="model_not_found")
    if errors:
        message = "; ".join(f"{rename(e.field)}: {e.message}" for e in errors[:8])
        return error_response(400, message, param=rename(errors[0].field), code="invalid_value")
    status = HTTP_STATUS[error.kind]
    code = {429: "rate_limit_exceeded", 504: "timeout"}.get(status, error.kind.value)
    return error_response(status, error.message, code=code)


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

    @app.middleware("http")
    async def bearer_token(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if door.token and request.url.path.startswith("/v1/"):
            sent = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(sent, f"Bearer {door.token}".encode()):
                return error_response(
                    401, "missing or wrong API key: send 'Authorization: Bearer <token>'", code="invalid_api_key"
                )
        return await call_next(request)

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

    if explorer:
        from attnserve.server.api.explorer import add_explorer_routes

        add_explorer_routes(app)
    return app


class TokenizeBody(BaseModel):
    """POST /tokenize: one of a prompt (encoded as /v1/completions would) or messages (the chat template)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[ChatMessageBody] | None = None


def model_card(info: EngineInfo, created: int) -> dict[str, Any]:
    """The OpenAI model object, with the shape a client needs to ask for attention (layers, heads)."""
    return {
        "id": info.model_name,
        "object": "model",
        "created": created,
        "owned_by": "attnserve",
        "architecture": info.architecture,
        "context_length": info.context_length,
        "vocab_size": info.vocab_size,
        "num_layers": info.num_layers,
        "num_heads": info.num_heads,
        "num_kv_heads": info.num_kv_heads,
        "layer_windows": list(info.layer_windows),  # per layer: its sliding window, 0 = whole context
        "hidden_size": info.hidden_size,  # the length of a steering vector and of a residual read
        "dtype": info.dtype,
        "device": info.device,
    }


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


# ------------------------------------------------------------------ shapes
class _Shape:
    """How one endpoint writes its responses and chunks."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, service: GenerationService, body: CompletionBody | ChatBody) -> None:
        self.service, self.body = service, body
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = ""

    def rename(self, neutral: str) -> str:
        return neutral

    def envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model, "choices": choices}

    def choice_extras(self, choice: dict[str, Any], c: _Choice) -> None:
        if self.body.attention is not None:
            choice["attention"] = [attention_json(r) for r in c.attention]
        if self.body.prompt_logprobs is not None and c.prompt_logprobs:
            choice["prompt_logprobs"] = [self.logprob_json(lp.token_id or 0, lp) for lp in c.prompt_logprobs]
        if self.body.residuals is not None:
            choice["residuals"] = [residual_json(r) for r in c.residuals]
        if self.body.logit_lens is not None:
            choice["logit_lens"] = [self.lens_json(r) for r in c.lens]

    def lens_json(self, row: LensRow) -> dict[str, Any]:
        return {
            "layer": row.layer,
            "position": row.position,
            "token_ids": row.token_ids,
            "tokens": self.service.token_texts(row.token_ids),
            "probs": row.probs,
        }

    def with_token_ids(self, choice: dict[str, Any], tokens: Sequence[int]) -> dict[str, Any]:
        if self.body.return_token_ids:
            choice["token_ids"] = list(tokens)
        return choice

    def logprob_json(self, token: int, lp: TokenLogprobs) -> dict[str, Any]:
        ids = [token, *lp.top_token_ids]
        texts, raw = self.service.token_texts(ids), self.service.token_bytes(ids)
        return {
            "token": texts[0],
            "logprob": lp.logprob,
            "bytes": list(raw[0]),
            "top_logprobs": [
                {"token": t, "logprob": v, "bytes": list(b)}
                for t, v, b in zip(texts[1:], lp.top_logprobs, raw[1:], strict=True)
            ],
        }


class TextCompletion(_Shape):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def choice(
        self,
        index: int,
        text: str,
        tokens: Sequence[int],
        lps: Sequence[TokenLogprobs],
        finish: str | None,
        offset: int = 0,
    ) -> dict[str, Any]:
        logprobs = None
        if self.body.logprobs is not None:
            entries = [self.logprob_json(t, lp) for t, lp in zip(tokens, lps, strict=False)]
            offsets, at = [], offset
            for e in entries:
                offsets.append(at)
                at += len(e["token"])
            logprobs = {
                "tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets,
            }
        return self.with_token_ids(
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}, tokens
        )


class ChatCompletion(_Shape):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, service: GenerationService, body: ChatBody) -> None:
        super().__init__(service, body)
        self.chat = body
        # Tool calls are looked for when tools were given and not turned off (tool_choice "none").
        self.parses_tools = bool(body.tools) and body.tool_choice != "none"
        self._parsers: dict[int, ToolCallParser] = {}

    def parser(self, index: int) -> ToolCallParser:
        if index not in self._parsers:
            self._parsers[index] = ToolCallParser(self.service.rules.tool_format)
        return self._parsers[index]

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """A whole answer's message, with its tool calls parsed out; True if it has any."""
        if not self.parses_tools:
            return {"role": "assistant", "content": text}, False
        content, calls = parse_whole(text, self.service.rules.tool_format)
        if not calls:
            return {"role": "assistant", "content": content}, False
        rendered = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
        return {"role": "assistant", "content": content or None, "tool_calls": rendered}, True

    def stream_delta(self, index: int, text: str, finished: bool) -> tuple[dict[str, Any], bool]:
        """A chunk's delta: content, and tool-call pieces as OpenAI streams them; True once a call was seen."""
        if not self.parses_tools:
            return ({"content": text} if text or not finished else {}), False
        parser = self.parser(index)
        parsed = parser.feed(text)
        if finished:
            tail = parser.finish()
            parsed.content += tail.content
            parsed.calls += tail.calls
        delta: dict[str, Any] = {}
        if parsed.content:
            delta["content"] = parsed.content
        if parsed.calls:
            delta["tool_calls"] = [_call_delta(c) for c in parsed.calls]
        return delta, bool(parser.calls)

    def rename(self, neutral: str) -> str:
        return "top_logprobs" if neutral == "logprobs" else neutral

    def choice(
        self,
        index: int,
        text: str,
        tokens: Sequence[int],
        lps: Sequence[TokenLogprobs],
        finish: str | None,
        offset: int = 0,
        *,
        delta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        logprobs = None
        if self.body.logprobs:
            logprobs = {"content": [self.logprob_json(t, lp) for t, lp in zip(tokens, lps, strict=False)]}
        content = {"role": "assistant", "content": text} if delta is None else delta
        key = "message" if delta is None else "delta"
        return self.with_token_ids(
            {"index": index, key: content, "logprobs": logprobs, "finish_reason": finish}, tokens
        )


def residual_json(row: ResidualRow) -> dict[str, Any]:
    """One residual vector: base64 of hidden_size little-endian values in ``dtype``."""
    return {
        "point": row.point,
        "layer": row.layer,
        "position": row.position,
        "dtype": row.dtype.value,
        "values": base64.b64encode(row.values).decode(),
    }


def _call_delta(c: CallDelta) -> dict[str, Any]:
    """One ``delta.tool_calls[i]``: id, type and name on a call's first piece, then arguments."""
    function: dict[str, Any] = {"arguments": c.arguments}
    if c.name is not None:
        function = {"name": c.name, **function}
    return {"index": c.index, **({"id": c.id, "type": "function"} if c.id else {}), "function": function}


def attention_json(row: AttentionRow) -> dict[str, Any]:
    """One row: base64 of little-endian weights of shape (num_heads, context_len) in ``dtype``."""
    return {
        "layer": row.layer,
        "position": row.position,
        "num_heads": row.num_heads,
        "context_len": row.context_len,
        "dtype": row.dtype.value,
        "weights": base64.b64encode(row.weights).decode(),
        **(
            {"num_kept": row.num_kept, "positions": base64.b64encode(row.positions).decode()}  # top_k rows
            if row.num_kept
            else {}
        ),
        **({"num_spans": row.num_spans} if row.num_spans else {}),  # weights: (num_heads, num_spans) sums
    }


def usage_json(delta: CompletionDelta) -> dict[str, Any] | None:
    u = delta.usage
    if u is None:
        return None
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


# ------------------------------------------------------------------ serving
async def _generate(door: HttpDoor, body: CompletionBody | ChatBody, request: Request, shape: _Shape) -> Response:
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
        return _ClosingStreamingResponse(_sse(shape, first, deltas, include_usage), media_type="text/event-stream")
    try:
        return JSONResponse(await _whole(shape, first, deltas))
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


@dataclass
class _Choice:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    attention: list[AttentionRow] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    residuals: list[ResidualRow] = field(default_factory=list)
    lens: list[LensRow] = field(default_factory=list)
    finish: str | None = None

    @classmethod
    def of(cls, out: RequestOutput) -> _Choice:
        return cls(attention=out.attention, prompt_logprobs=out.prompt_logprobs, residuals=out.residuals, lens=out.lens)


async def _whole(shape: _Shape, first: CompletionDelta, rest: AsyncIterator[CompletionDelta]) -> dict[str, Any]:
    choices: dict[int, _Choice] = {}
    usage = None
    delta: CompletionDelta | None = first
    while delta is not None:
        c, out = choices.setdefault(delta.index, _Choice()), delta.output
        c.text += out.text
        c.tokens += out.token_ids
        c.logprobs += out.logprobs
        c.attention += out.attention
        c.prompt_logprobs += out.prompt_logprobs
        c.residuals += out.residuals
        c.lens += out.lens
        c.finish = out.finish_reason.value if out.finish_reason else c.finish
        usage = usage_json(delta) or usage
        delta = await anext(rest, None)
    rendered = []
    for index in sorted(choices):
        c = choices[index]
        choice = shape.choice(index, c.text, c.tokens, c.logprobs, c.finish)
        if isinstance(shape, ChatCompletion):
            choice["message"], has_calls = shape.message(c.text)
            if has_calls and c.finish == "stop":  # a call cut by max_tokens keeps "length"
                choice["finish_reason"] = "tool_calls"
        shape.choice_extras(choice, c)
        rendered.append(choice)
    return {**shape.envelope(shape.object_name, rendered), "usage": usage}


async def _sse(
    shape: _Shape, first: CompletionDelta, rest: AsyncIterator[CompletionDelta], include_usage: bool
) -> AsyncIterator[str]:
    """data: {chunk} per delta, an error chunk if the stream is cut, data: [DONE]."""
    offsets: dict[int, int] = {}
    delta: CompletionDelta | None = first
    try:
        if isinstance(shape, ChatCompletion):  # the role comes first, in its own chunk, as OpenAI sends it
            for index in range(shape.body.n or 1):
                opening = shape.choice(index, "", [], [], None, delta={"role": "assistant", "content": ""})
                yield _event(shape.envelope(shape.chunk_name, [opening]))
        while delta is not None:
            yield _event(shape.envelope(shape.chunk_name, [_chunk_choice(shape, delta, offsets)]))
            if delta.usage is not None and include_usage:
                yield _event({**shape.envelope(shape.chunk_name, []), "usage": usage_json(delta)})
            delta = await anext(rest, None)
    except ServiceError as error:
        payload = json.loads(service_error_response(error, shape.rename).body)
        yield _event(payload)
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"


def _chunk_choice(shape: _Shape, delta: CompletionDelta, offsets: dict[int, int]) -> dict[str, Any]:
    out = delta.output
    finish = out.finish_reason.value if out.finish_reason else None
    offset = offsets.get(delta.index, 0)
    offsets[delta.index] = offset + len(out.text)
    if isinstance(shape, ChatCompletion):
        content, has_calls = shape.stream_delta(delta.index, out.text, finish is not None)
        if finish == "stop" and has_calls:
            finish = "tool_calls"
        choice = shape.choice(delta.index, out.text, out.token_ids, out.logprobs, finish, delta=content)
    else:
        choice = shape.choice(delta.index, out.text, out.token_ids, out.logprobs, finish, offset)  # type: ignore[call-arg]
    shape.choice_extras(choice, _Choice.of(out))
    return choice


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
