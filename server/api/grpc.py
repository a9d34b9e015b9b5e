"""The gRPC door: protobuf messages to the engine's plain requests and back, errors to status codes.

The only module (with the process wiring in server/app.py) that sees generated
protobuf types. Checking, prompt building and admission are the door-neutral
GenerationService's; this module converts, and maps each error kind to a status.
"""

from __future__ import annotations

import array
import re
from collections.abc import AsyncIterator

import grpc

from attnserve.server.api.errors import ErrorKind, ServiceError
from attnserve.server.api.serving import GenerationService
from attnserve.server.api.validation import AttentionSpec, ChatTurn, FieldError, GenerationRequest, Prompt
from attnserve.server.engine.outputs import RequestOutput
from attnserve.server.engine.request import FinishReason
from attnserve.v1 import generate_pb2 as pb
from attnserve.v1 import generate_pb2_grpc as pb_grpc

STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_REDUCTION = {pb.HEAD_REDUCTION_NONE: "none", pb.HEAD_REDUCTION_MEAN: "mean", pb.HEAD_REDUCTION_MAX: "max"}
# Neutral field names -> where they sit in a GenerateRequest.
_WIRE_NAMES = {
    "token_ids": "token_ids.ids",
    "messages": "messages.messages",
    "logprobs": "logprobs.top_n",
    **{name: f"sampling.{name}" for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")},
    **{name: f"stopping.{name}" for name in ("max_tokens", "stop", "stop_token_ids", "ignore_eos")},
}
_LEADING_NAME = re.compile(r"^[a-z_]+")


def wire_field(neutral: str) -> str:
    """'temperature' -> 'sampling.temperature', 'token_ids[3]' -> 'token_ids.ids[3]'."""
    return _LEADING_NAME.sub(lambda m: _WIRE_NAMES.get(m.group(0), m.group(0)), neutral, count=1)


def field_errors_message(errors: list[FieldError]) -> str:
    return "; ".join(f"{wire_field(e.field)}: {e.message}" for e in errors)


# ------------------------------------------------------------------ requests
def generation_request(request: pb.GenerateRequest) -> GenerationRequest:
    s, st = request.sampling, request.stopping
    which = request.WhichOneof("input")

    def opt(message: object, name: str) -> object:
        return getattr(message, name) if message.HasField(name) else None  # type: ignore[attr-defined]

    attention = None
    if request.HasField("attention"):
        a = request.attention
        reduction = (
            _REDUCTION.get(a.head_reduction, str(a.head_reduction))
            if a.head_reduction != pb.HEAD_REDUCTION_UNSPECIFIED
            else None
        )
        attention = AttentionSpec(tuple(a.layers), reduction, a.include_prompt)
    return GenerationRequest(
        prompt=request.prompt if which == "prompt" else None,
        messages=_turns(request.messages) if which == "messages" else None,
        token_ids=tuple(request.token_ids.ids) if which == "token_ids" else None,
        model=request.model,
        request_id=request.request_id,
        temperature=opt(s, "temperature"),  # type: ignore[arg-type]
        top_k=opt(s, "top_k"),  # type: ignore[arg-type]
        top_p=opt(s, "top_p"),  # type: ignore[arg-type]
        min_p=opt(s, "min_p"),  # type: ignore[arg-type]
        repetition_penalty=opt(s, "repetition_penalty"),  # type: ignore[arg-type]
        seed=opt(s, "seed"),  # type: ignore[arg-type]
        max_tokens=opt(st, "max_tokens"),  # type: ignore[arg-type]
        stop=tuple(st.stop),
        stop_token_ids=tuple(st.stop_token_ids),
        ignore_eos=st.ignore_eos,
        logprobs=request.logprobs.top_n if request.HasField("logprobs") else None,
        attention=attention,
    )


def _turns(messages: pb.ChatMessages) -> tuple[ChatTurn, ...]:
    return tuple(ChatTurn(m.role, m.content) for m in messages.messages)


# ------------------------------------------------------------------ responses
def _logprobs(out: RequestOutput) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=token,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)],
        )
        for token, lp in zip(out.token_ids, out.logprobs, strict=False)
    ]


def _attention(out: RequestOutput) -> list[pb.AttentionRow]:
    rows = []
    for r in out.attention:
        weights = array.array("f")
        weights.frombytes(r.weights)
        rows.append(
            pb.AttentionRow(
                layer=r.layer, position=r.position, num_heads=r.num_heads, context_len=r.context_len, weights=weights
            )
        )
    return rows


def _fill_final(message: pb.GenerateResponse | pb.GenerateStreamResponse, out: RequestOutput) -> None:
    assert out.finish_reason is not None
    message.finish_reason = _FINISH[out.finish_reason]
    if isinstance(out.stop_reason, str):
        message.stop_sequence = out.stop_reason
    elif isinstance(out.stop_reason, int):
        message.stop_token_id = out.stop_reason
    if out.usage is not None:
        message.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=out.usage.prompt_tokens,
                completion_tokens=out.usage.completion_tokens,
                cached_tokens=out.usage.cached_tokens,
            )
        )
    if out.timings is not None:
        t = out.timings
        message.timings.CopyFrom(
            pb.Timings(queue_seconds=t.queue_s, time_to_first_token_seconds=t.ttft_s or 0.0, total_seconds=t.total_s)
        )


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    message = field_errors_message(error.field_errors) if error.field_errors else error.message
    await context.abort(STATUS[error.kind], message)


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        async for out in self._outputs(request, context):
            response.request_id = out.request_id
            response.token_ids.extend(out.token_ids)
            response.text += out.text
            response.logprobs.extend(_logprobs(out))
            response.attention.extend(_attention(out))
            if out.finished:
                _fill_final(response, out)
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for out in self._outputs(request, context):
            message = pb.GenerateStreamResponse(
                request_id=out.request_id,
                token_ids=out.token_ids,
                text=out.text,
                logprobs=_logprobs(out),
                attention=_attention(out),
            )
            if out.finished:
                _fill_final(message, out)
            yield message

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        which = request.WhichOneof("input")
        try:
            if which == "text":
                prompt = Prompt("prompt", text=request.text)
            elif which == "messages":
                prompt = Prompt("messages", messages=_turns(request.messages))
            else:
                raise ServiceError(ErrorKind.INVALID_ARGUMENT, "input: set one of text or messages")
            ids = await self.service.tokenize(prompt)
        except ServiceError as error:
            await abort_with(context, error)
            raise  # unreachable: abort raises
        return pb.TokenizeResponse(token_ids=ids, tokens=self.service.token_texts(ids))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            info = self.service.info()
        except ServiceError as error:
            await abort_with(context, error)
            raise
        return pb.ModelInfo(
            name=info.model_name,
            architecture=info.architecture,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            dtype=info.dtype,
            device=info.device,
            num_layers=info.num_layers,
            num_heads=info.num_heads,
            kv_cache_blocks=info.kv_cache_blocks,
            kv_cache_block_size=info.kv_cache_block_size,
            kv_cache_bytes=info.kv_cache_bytes,
        )

    async def _outputs(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.service.generate(generation_request(request), timeout_s=context.time_remaining()):
                yield out
        except ServiceError as error:
            await abort_with(context, error)
