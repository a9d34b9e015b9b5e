"""The OpenAI-compatible HTTP door's response writers: completions and chat completions, whole
or as server-sent-event chunks, the rows a request asked to see, and errors in OpenAI's shape
({"error": {"message", "type", "param", "code"}} with the status an OpenAI client expects).

The routes (server/api/openai.py) hand each request's deltas to a :class:`TextCompletion` or
:class:`ChatCompletion` and return :func:`whole_body` or :func:`sse_events`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from attnserve.server.api.errors import ErrorKind, ServiceError
from attnserve.server.api.openai_schema import ChatBody, CompletionBody
from attnserve.server.api.serving import CompletionDelta, GenerationService, WholeResponse
from attnserve.server.api.tools import CallDelta, ToolCallParser, parse_whole
from attnserve.server.engine.outputs import RequestOutput, Usage
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


class Shape:
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

    def choice_extras(self, choice: dict[str, Any], c: RequestOutput) -> None:
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


class TextCompletion(Shape):
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


class ChatCompletion(Shape):
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


def usage_json(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


# ------------------------------------------------------------------ bodies
async def whole_body(shape: Shape, first: CompletionDelta, rest: AsyncIterator[CompletionDelta]) -> dict[str, Any]:
    """The unary answer: every delta gathered by the service's accumulator, then written once."""
    whole = WholeResponse(first.request_id)
    delta: CompletionDelta | None = first
    while delta is not None:
        whole.add(delta)
        delta = await anext(rest, None)
    rendered = []
    for index, out in whole.completions:
        finish = out.finish_reason.value if out.finish_reason else None
        choice = shape.choice(index, out.text, out.token_ids, out.logprobs, finish)
        if isinstance(shape, ChatCompletion):
            choice["message"], has_calls = shape.message(out.text)
            if has_calls and finish == "stop":  # a call cut by max_tokens keeps "length"
                choice["finish_reason"] = "tool_calls"
        shape.choice_extras(choice, out)
        rendered.append(choice)
    usage = usage_json(whole.usage) if whole.usage is not None else None
    return {**shape.envelope(shape.object_name, rendered), "usage": usage}


async def sse_events(
    shape: Shape, first: CompletionDelta, rest: AsyncIterator[CompletionDelta], include_usage: bool
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
                yield _event({**shape.envelope(shape.chunk_name, []), "usage": usage_json(delta.usage)})
            delta = await anext(rest, None)
    except ServiceError as error:
        payload = json.loads(service_error_response(error, shape.rename).body)
        yield _event(payload)
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"


def _chunk_choice(shape: Shape, delta: CompletionDelta, offsets: dict[int, int]) -> dict[str, Any]:
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
    shape.choice_extras(choice, out)
    return choice


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
