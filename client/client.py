"""attnserve's Python client: a sync `Client` and an `AsyncClient` on one request builder.

    from attnserve.client import Client
    with Client("localhost:50051") as c:
        print(c.generate("What is the capital of France?", chat=True, max_tokens=32).text)
        for chunk in c.generate_stream("Once upon a time", max_tokens=64):
            print(chunk.text, end="", flush=True)

Needs only grpcio and the generated stubs (no torch). Errors are `AttnserveError`
subclasses carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.client.inspection import POINTS, Ablate, Steer
from attnserve.v1 import generate_pb2 as pb
from attnserve.v1 import generate_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
# A chat turn: (role, content), or a mapping with role, content and, for tool calling, tool_calls
# (OpenAI's shape or pb.ToolCall) and tool_call_id.
Message = Mapping[str, Any] | tuple[str, str]
_TOOL_CHOICES = {
    "auto": pb.TOOL_CHOICE_AUTO,
    "none": pb.TOOL_CHOICE_NONE,
    "required": pb.TOOL_CHOICE_REQUIRED,
}


# ----------------------------------------------------------------------- errors
class AttnserveError(Exception):
    """Base of every error this client raises; ``code`` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(AttnserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(AttnserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(AttnserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(AttnserveError):
    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(AttnserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class CancelledError(AttnserveError):
    code = grpc.StatusCode.CANCELLED


class AbortedError(AttnserveError):
    code = grpc.StatusCode.ABORTED


class NotFoundError(AttnserveError):
    code = grpc.StatusCode.NOT_FOUND


_ERRORS: dict[grpc.StatusCode, type[AttnserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnavailableError,
        UnauthenticatedError,
        CancelledError,
        AbortedError,
        NotFoundError,
    )
}


def _error(err: grpc.RpcError) -> AttnserveError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return _ERRORS.get(code, AttnserveError)(details or "", code)


# ---------------------------------------------------------------------- request
_REDUCTIONS = {"none": pb.HEAD_REDUCTION_NONE, "mean": pb.HEAD_REDUCTION_MEAN, "max": pb.HEAD_REDUCTION_MAX}
_DTYPES = {"float16": pb.WEIGHTS_DTYPE_FLOAT16, "float32": pb.WEIGHTS_DTYPE_FLOAT32}


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Message] | None = None,
    token_ids: Sequence[int] | None = None,
    chat: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    attention_layers: Sequence[int] | None = None,
    head_reduction: str = "mean",
    include_prompt: bool = False,
    attention_dtype: str = "float16",
    attention_top_k: int = 0,
    attention_spans: Sequence[tuple[int, int]] = (),
    residual_points: Sequence[str] = (),
    residual_layers: Sequence[int] = (),
    residual_dtype: str = "float32",
    logit_lens_layers: Sequence[int] = (),
    logit_lens_top_k: int = 5,
    inspect_prompt: bool = False,
    steering: Sequence[Steer] = (),
    ablations: Sequence[Ablate] = (),
    n: int | None = None,
    priority: int = 0,
    request_id: str = "",
    model: str = "",
    json_schema: str | Mapping[str, Any] | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
    tools: Sequence[Mapping[str, Any]] = (),
    tool_choice: str | None = None,
    parallel_tool_calls: bool | None = None,
) -> pb.GenerateRequest:
    """One GenerateRequest from keyword arguments. ``chat=True`` sends ``prompt`` as a user message.
    Unset sampling fields take the server's defaults (GetServerInfo.default_sampling).
    At most one constraint: ``json_schema`` (a dict or JSON text), ``json_object``, ``regex``,
    ``choice`` (strings) or ``grammar`` (Lark). ``tools`` (OpenAI function specs) with ``tool_choice``
    "auto", "none", "required" or a function's name.

    Look inside: ``residual_points`` (resid_pre, attn_out, resid_mid, mlp_out, resid_post) at
    ``residual_layers``; ``logit_lens_layers`` with their ``logit_lens_top_k``; both for each generated
    token, and every prompt position with ``inspect_prompt``. Steer: ``steering`` vectors and
    head ``ablations`` (client.inspection.Steer, Ablate)."""
    request = pb.GenerateRequest(request_id=request_id, model=model, priority=priority)
    if chat and prompt is not None:
        messages, prompt = [("user", prompt)], None
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    if prompt is not None:
        request.prompt = prompt
    request.messages.extend(_chat_messages(messages or ()))
    request.token_ids.extend(token_ids or ())
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    for name, value in (*sampling.items(), ("repetition_penalty", repetition_penalty)):
        if value is not None:
            setattr(request.sampling, name, value)
    if max_tokens is not None:
        request.stopping.max_tokens = max_tokens
    request.stopping.stop.extend(stop)
    request.stopping.stop_token_ids.extend(stop_token_ids)
    request.stopping.ignore_eos = ignore_eos
    if logprobs is not None:
        request.logprobs.top_n = logprobs
    if prompt_logprobs is not None:
        request.prompt_logprobs.top_n = prompt_logprobs
    if n is not None:
        request.n = n
    if attention_layers is not None:
        _ask_attention(
            request, attention_layers, head_reduction, include_prompt, attention_dtype, attention_top_k, attention_spans
        )
    _ask_inspection(
        request, residual_points, residual_layers, residual_dtype, logit_lens_layers, logit_lens_top_k, inspect_prompt
    )
    request.steering.extend(s.message() for s in steering)
    request.ablations.extend(a.message() for a in ablations)
    constraints = dict(
        json_schema=json_schema, json_object=json_object or None, regex=regex, choice=choice, grammar=grammar
    )
    given = {k: v for k, v in constraints.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one constraint, got {', '.join(given)}")
    for name, value in given.items():
        if name == "json_schema":
            request.constraint.json_schema = value if isinstance(value, str) else json.dumps(value)
        elif name == "choice":
            request.constraint.choice.choices.extend(value)
        else:
            setattr(request.constraint, name, value)
    request.tools.extend(_tool(t) for t in tools)
    if tool_choice is not None:
        if tool_choice in _TOOL_CHOICES:
            request.tool_choice = _TOOL_CHOICES[tool_choice]
        else:
            request.tool_choice, request.tool_choice_name = pb.TOOL_CHOICE_FUNCTION, tool_choice
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = parallel_tool_calls
    return request


def _ask_attention(
    request: pb.GenerateRequest,
    layers: Sequence[int],
    head_reduction: str,
    include_prompt: bool,
    dtype: str,
    top_k: int,
    spans: Sequence[tuple[int, int]],
) -> None:
    if head_reduction not in _REDUCTIONS or dtype not in _DTYPES:
        raise ValueError(
            f"head_reduction: one of {', '.join(_REDUCTIONS)}; attention_dtype: one of {', '.join(_DTYPES)}"
        )
    request.attention.layers.extend(layers)
    request.attention.head_reduction = _REDUCTIONS[head_reduction]
    request.attention.include_prompt = include_prompt
    request.attention.dtype = _DTYPES[dtype]
    request.attention.top_k = top_k
    for start, end in spans:
        request.attention.spans.add(start=start, end=end)


def _ask_inspection(
    request: pb.GenerateRequest,
    points: Sequence[str],
    layers: Sequence[int],
    dtype: str,
    lens_layers: Sequence[int],
    lens_top_k: int,
    include_prompt: bool,
) -> None:
    if points or layers:
        request.residuals.points.extend(POINTS[p] for p in points)
        request.residuals.layers.extend(layers)
        request.residuals.include_prompt = include_prompt
        request.residuals.dtype = _DTYPES[dtype]
    if lens_layers:
        request.logit_lens.layers.extend(lens_layers)
        request.logit_lens.top_k = lens_top_k
        request.logit_lens.include_prompt = include_prompt


def _chat_messages(messages: Sequence[Message]) -> list[pb.ChatMessage]:
    turns = []
    for m in messages:
        if not isinstance(m, Mapping):
            turns.append(pb.ChatMessage(role=m[0], content=m[1]))
            continue
        turn = pb.ChatMessage(role=m["role"], content=m.get("content") or "", tool_call_id=m.get("tool_call_id") or "")
        for call in m.get("tool_calls") or ():
            if isinstance(call, pb.ToolCall):
                turn.tool_calls.append(call)
            else:  # OpenAI's shape
                function = call["function"]
                turn.tool_calls.add(id=call.get("id", ""), name=function["name"], arguments=function["arguments"])
        turns.append(turn)
    return turns


def _tool(tool: Mapping[str, Any]) -> pb.Tool:
    """A tool from OpenAI's shape ({"type": "function", "function": {...}}) or the function alone."""
    function = tool.get("function", tool)
    parameters = function.get("parameters")
    return pb.Tool(
        name=function["name"],
        description=function.get("description") or "",
        parameters_json="" if parameters is None else json.dumps(parameters),
    )


def _tokenize_request(text: str | None, messages: Sequence[Message] | None) -> pb.TokenizeRequest:
    request = pb.TokenizeRequest(text=text) if text is not None else pb.TokenizeRequest()
    request.messages.extend(_chat_messages(messages or ()))
    return request


class _Connection:
    """Channel, stubs, metadata and default deadline shared by both clients."""

    _secure_channel: Any = staticmethod(grpc.secure_channel)
    _insecure_channel: Any = staticmethod(grpc.insecure_channel)

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """``options`` are extra gRPC channel arguments, e.g. a round-robin service config."""
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.keepalive_time_ms", 30_000), *options]
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates)
            self._channel = self._secure_channel(target, creds, options=options)
        else:
            self._channel = self._insecure_channel(target, options=options)
        self._stub = pb_grpc.GeneratorServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)


# ------------------------------------------------------------------------- sync
class Client(_Connection):
    """Blocking client. ``timeout`` (seconds) becomes each call's gRPC deadline."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err) from None

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        return self._call(self._stub.Generate, build_request(prompt, **kwargs), timeout)

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateStreamResponse]:
        call = self._stub.GenerateStream(
            build_request(prompt, **kwargs), timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            yield from call
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            call.cancel()  # a reader that stops early frees the server's work at once

    def send(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> pb.GenerateResponse:
        """Send a prepared request (see build_request)."""
        return self._call(self._stub.Generate, request, timeout)

    def tokenize(self, text: str | None = None, *, messages: Sequence[Message] | None = None) -> pb.TokenizeResponse:
        return self._call(self._stub.Tokenize, _tokenize_request(text, messages), None)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), None)

    def server_info(self) -> pb.GetServerInfoResponse:
        return self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), None)

    def abort(self, request_id: str) -> None:
        """End a request in flight (its stream ends with AbortedError). NotFoundError if none."""
        self._call(self._stub.Abort, pb.AbortRequest(request_id=request_id), None)

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING', ... for the server (or one service)."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), None)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ------------------------------------------------------------------------ async
class AsyncClient(_Connection):
    """The same calls on grpc.aio; use inside a running event loop."""

    _secure_channel = staticmethod(grpc.aio.secure_channel)
    _insecure_channel = staticmethod(grpc.aio.insecure_channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err) from None

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        return await self._call(self._stub.Generate, build_request(prompt, **kwargs), timeout)

    async def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self._stub.GenerateStream(
            build_request(prompt, **kwargs), timeout=timeout or self._timeout, metadata=self._metadata
        )
        try:
            async for message in call:
                yield message
        except grpc.RpcError as err:
            raise _error(err) from None
        finally:
            call.cancel()

    async def tokenize(
        self, text: str | None = None, *, messages: Sequence[Message] | None = None
    ) -> pb.TokenizeResponse:
        return await self._call(self._stub.Tokenize, _tokenize_request(text, messages), None)

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), None)

    async def server_info(self) -> pb.GetServerInfoResponse:
        return await self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), None)

    async def abort(self, request_id: str) -> None:
        await self._call(self._stub.Abort, pb.AbortRequest(request_id=request_id), None)

    async def health(self, service: str = "") -> str:
        reply = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), None)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
