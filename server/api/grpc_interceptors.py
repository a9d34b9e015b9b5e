"""gRPC server interceptors: bearer-token authentication, and malformed requests refused as
INVALID_ARGUMENT (grpc would answer UNKNOWN and log a traceback)."""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# Probes and tooling must work without the token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        sent = metadata.get("authorization", "")
        if hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self._expected):
            return handler
        return _deny(handler)


async def _abort(context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"
    )


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream or handler.stream_stream:

        async def deny_stream(_request, context):  # type: ignore[no-untyped-def]
            await _abort(context)
            yield  # pragma: no cover -- makes this an async generator

        factory = (
            grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        )
        return factory(deny_stream, **kw)

    async def deny(_request, context):  # type: ignore[no-untyped-def]
        await _abort(context)

    factory = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
    return factory(deny, **kw)


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Parses requests itself so that bytes which are not a valid message (bad UTF-8 in a string
    field, a truncated buffer) get INVALID_ARGUMENT with the parser's reason, not UNKNOWN."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def tolerant(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception as exc:  # DecodeError and friends: the caller sent bytes, not a message
                return _Malformed(f"{type(exc).__name__}: {exc}")

        kw = {"request_deserializer": tolerant, "response_serializer": handler.response_serializer}
        if handler.unary_stream:
            behavior = handler.unary_stream
            if not inspect.isasyncgenfunction(behavior):  # a coroutine that writes (health's Watch)

                async def checked_writer(request, context):  # type: ignore[no-untyped-def]
                    if isinstance(request, _Malformed):
                        await _refuse(context, details.method, request)
                    await behavior(request, context)

                return grpc.unary_stream_rpc_method_handler(checked_writer, **kw)

            async def checked_stream(request, context):  # type: ignore[no-untyped-def]
                if isinstance(request, _Malformed):
                    await _refuse(context, details.method, request)
                async for message in behavior(request, context):
                    yield message

            return grpc.unary_stream_rpc_method_handler(checked_stream, **kw)
        unary = handler.unary_unary

        async def checked(request, context):  # type: ignore[no-untyped-def]
            if isinstance(request, _Malformed):
                await _refuse(context, details.method, request)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(checked, **kw)


async def _refuse(context: grpc.aio.ServicerContext, method: str, request: _Malformed) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request to {method} is not a valid protobuf message ({request.reason}); "
        "check that string fields hold UTF-8 text",
    )
