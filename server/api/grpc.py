"""The gRPC door: protobuf messages to the engine's plain requests and back, errors to status codes.

The only module (with the process wiring in server/app.py and the interceptors) that sees
generated protobuf types. Checking, prompt building and admission are the door-neutral
GenerationService's; this module converts, splits long payloads over several stream
messages, and maps each error kind to a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import replace

import grpc

from attnserve.server.api.errors import ErrorKind, ServiceError
from attnserve.server.api.inspection import AblationSpec, InspectionSpec, LensSpec, ResidualSpec, SteeringSpec
from attnserve.server.api.records import (
    AttentionSpec,
    ChatTurn,
    ConstraintSpec,
    FieldError,
    GenerationRequest,
    Prompt,
)
from attnserve.server.api.serving import CompletionDelta, GenerationService, ServerInfo, WholeResponse
from attnserve.server.api.tools import ToolCallParser, ToolSpec, parse_whole
from attnserve.server.engine.outputs import RequestOutput, Timings, Usage
from attnserve.server.engine.records import AttentionRow, LensRow, ResidualRow, TokenLogprobs
from attnserve.server.engine.request import FinishReason, WeightsDtype
from attnserve.v1 import generate_pb2 as pb
from attnserve.v1 import generate_pb2_grpc as pb_grpc

STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CONSTRAINT: pb.FINISH_REASON_CONSTRAINT,
}
_REDUCTION = {pb.HEAD_REDUCTION_NONE: "none", pb.HEAD_REDUCTION_MEAN: "mean", pb.HEAD_REDUCTION_MAX: "max"}
_DTYPE_IN = {pb.WEIGHTS_DTYPE_FLOAT16: "float16", pb.WEIGHTS_DTYPE_FLOAT32: "float32"}
_DTYPE_OUT = {WeightsDtype.FLOAT16: pb.WEIGHTS_DTYPE_FLOAT16, WeightsDtype.FLOAT32: pb.WEIGHTS_DTYPE_FLOAT32}
_POINT_IN = {
    pb.RESIDUAL_POINT_RESID_PRE: "resid_pre",
    pb.RESIDUAL_POINT_ATTN_OUT: "attn_out",
    pb.RESIDUAL_POINT_RESID_MID: "resid_mid",
    pb.RESIDUAL_POINT_MLP_OUT: "mlp_out",
    pb.RESIDUAL_POINT_RESID_POST: "resid_post",
}
_POINT_OUT = {name: value for value, name in _POINT_IN.items()}
_POSITIONS_IN = {
    pb.INTERVENTION_POSITIONS_UNSPECIFIED: "all",
    pb.INTERVENTION_POSITIONS_ALL: "all",
    pb.INTERVENTION_POSITIONS_PROMPT: "prompt",
    pb.INTERVENTION_POSITIONS_GENERATED: "generated",
}
# Neutral field names -> where they sit in a GenerateRequest.
_WIRE_NAMES = {
    "logprobs": "logprobs.top_n",
    "prompt_logprobs": "prompt_logprobs.top_n",
    **{name: f"sampling.{name}" for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")},
    **{name: f"stopping.{name}" for name in ("max_tokens", "stop", "stop_token_ids", "ignore_eos")},
}
_LEADING_NAME = re.compile(r"^[a-z_]+")
_MESSAGE_OVERHEAD = 4096  # bytes of a stream message besides its attention rows


def wire_field(neutral: str) -> str:
    """'temperature' -> 'sampling.temperature', 'logprobs' -> 'logprobs.top_n'."""
    return _LEADING_NAME.sub(lambda m: _WIRE_NAMES.get(m.group(0), m.group(0)), neutral, count=1)


def field_errors_message(errors: Sequence[FieldError], most: int = 8) -> str:
    """The errors in wire terms; past ``most`` only a count (status details travel in a header)."""
    shown = "; ".join(f"{wire_field(e.field)}: {e.message}" for e in errors[:most])
    return shown + (f"; and {len(errors) - most} more" if len(errors) > most else "")


# ------------------------------------------------------------------ requests
def generation_request(request: pb.GenerateRequest) -> GenerationRequest:
    s, st = request.sampling, request.stopping

    def opt(message: object, name: str) -> object:
        return getattr(message, name) if message.HasField(name) else None  # type: ignore[attr-defined]

    attention = None
    if request.HasField("attention"):
        a = request.attention
        attention = AttentionSpec(
            tuple(a.layers),
            None if a.head_reduction == pb.HEAD_REDUCTION_UNSPECIFIED else _REDUCTION.get(a.head_reduction, "?"),
            a.include_prompt,
            None if a.dtype == pb.WEIGHTS_DTYPE_UNSPECIFIED else _DTYPE_IN.get(a.dtype, "?"),
            a.top_k,
            tuple((span.start, span.end) for span in a.spans),
        )
    return GenerationRequest(
        prompt=opt(request, "prompt"),  # type: ignore[arg-type]
        messages=_turns(request.messages) or None,
        token_ids=tuple(request.token_ids) or None,
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
        prompt_logprobs=request.prompt_logprobs.top_n if request.HasField("prompt_logprobs") else None,
        attention=attention,
        n=opt(request, "n"),  # type: ignore[arg-type]
        priority=request.priority,
        constraint=_constraint(request),
        tools=tuple(ToolSpec(t.name, t.description, t.parameters_json or '{"type": "object"}') for t in request.tools),
        tool_choice=_TOOL_CHOICE.get(request.tool_choice, "?"),
        tool_choice_name=request.tool_choice_name or None,
        parallel_tool_calls=request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True,
        inspection=_inspection(request),
    )


def _inspection(request: pb.GenerateRequest) -> InspectionSpec | None:
    residuals = lens = None
    if request.HasField("residuals"):
        r = request.residuals
        residuals = ResidualSpec(
            tuple(_POINT_IN.get(p, "?") for p in r.points),
            tuple(r.layers),
            r.include_prompt,
            None if r.dtype == pb.WEIGHTS_DTYPE_UNSPECIFIED else _DTYPE_IN.get(r.dtype, "?"),
        )
    if request.HasField("logit_lens"):
        g = request.logit_lens
        lens = LensSpec(tuple(g.layers), g.top_k or None, g.include_prompt)
    steering = tuple(
        SteeringSpec(
            s.layer,
            s.vector,
            None if s.point == pb.RESIDUAL_POINT_UNSPECIFIED else _POINT_IN.get(s.point, "?"),
            s.scale if s.HasField("scale") else None,
            _POSITIONS_IN.get(s.positions, "?"),
        )
        for s in request.steering
    )
    ablations = tuple(AblationSpec(a.layer, tuple(a.heads), a.scale) for a in request.ablations)
    spec = InspectionSpec(residuals, lens, steering, ablations)
    return None if spec.is_empty else spec


def _constraint(request: pb.GenerateRequest) -> ConstraintSpec | None:
    if not request.HasField("constraint"):
        return None
    c = request.constraint
    kind = c.WhichOneof("kind")
    if kind is None:  # sent but empty: refused by validation, never silently unconstrained
        return ConstraintSpec("unset", field="constraint")
    name = f"constraint.{kind}"
    if kind == "choice":
        return ConstraintSpec("choice", choices=tuple(c.choice.choices), field=name)
    if kind == "json_object":
        return ConstraintSpec("json_object" if c.json_object else "unset", field=name)
    return ConstraintSpec(kind, getattr(c, kind), field=name)


def _turns(messages: Sequence[pb.ChatMessage]) -> tuple[ChatTurn, ...]:
    return tuple(
        ChatTurn(
            m.role,
            m.content,
            tool_calls_json=json.dumps(
                [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}
                    for c in m.tool_calls
                ]
            )
            if m.tool_calls
            else "",
            tool_call_id=m.tool_call_id,
        )
        for m in messages
    )


_TOOL_CHOICE = {
    pb.TOOL_CHOICE_UNSPECIFIED: "auto",
    pb.TOOL_CHOICE_AUTO: "auto",
    pb.TOOL_CHOICE_NONE: "none",
    pb.TOOL_CHOICE_REQUIRED: "required",
    pb.TOOL_CHOICE_FUNCTION: "function",
}


def parses_tool_calls(request: pb.GenerateRequest) -> bool:
    return bool(request.tools) and request.tool_choice != pb.TOOL_CHOICE_NONE


# ------------------------------------------------------------------ responses
def _logprobs(token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=token,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)],
        )
        for token, lp in zip(token_ids, logprobs, strict=False)
    ]


def _prompt_logprobs(logprobs: Sequence[TokenLogprobs]) -> list[pb.TokenLogprob]:
    return _logprobs([lp.token_id or 0 for lp in logprobs], logprobs)


def _row(r: AttentionRow) -> pb.AttentionRow:
    return pb.AttentionRow(
        layer=r.layer,
        position=r.position,
        num_heads=r.num_heads,
        context_len=r.context_len,
        weights=r.weights,
        dtype=_DTYPE_OUT[r.dtype],
        num_kept=r.num_kept,
        positions=r.positions,
        num_spans=r.num_spans,
    )


def _residual(r: ResidualRow) -> pb.ResidualVector:
    return pb.ResidualVector(
        point=_POINT_OUT[r.point], layer=r.layer, position=r.position, values=r.values, dtype=_DTYPE_OUT[r.dtype]
    )


def _lens(r: LensRow) -> pb.LensRow:
    return pb.LensRow(layer=r.layer, position=r.position, token_ids=r.token_ids, probs=r.probs)


def _usage(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_tokens
    )


def _timings(t: Timings) -> pb.Timings:
    message = pb.Timings(queue_seconds=t.queue_s, total_seconds=t.total_s)
    if t.ttft_s is not None:
        message.time_to_first_token_seconds = t.ttft_s
    return message


def _finish(message: pb.Completion | pb.GenerateStreamResponse, reason: FinishReason, stop: str | int | None) -> None:
    message.finish_reason = _FINISH[reason]
    if isinstance(stop, str):
        message.stop_sequence = stop
    elif isinstance(stop, int):
        message.stop_token_id = stop


def _close_if_cancelled(context: grpc.aio.ServicerContext, deltas: AsyncGenerator[CompletionDelta, None]) -> None:
    """A cancelled call's generator, closed now. gRPC cancels the task that reads the handler; a
    generator suspended at a ``yield`` (its delta being written) is then only closed when garbage
    collection reaches it, which can take many seconds: its requests would run on, unlogged."""
    if not context.cancelled() or deltas.ag_running:  # running: the cancel reaches it inside, as CancelledError
        return
    with contextlib.suppress(RuntimeError):  # called off the event loop: garbage collection will close it
        asyncio.get_running_loop().create_task(deltas.aclose())


def stream_messages(delta: CompletionDelta, max_bytes: int) -> Iterator[pb.GenerateStreamResponse]:
    """One delta as stream messages, each under ``max_bytes``: attention rows (and prompt logprobs)
    go out in as many messages as they need; tokens, text and the finish fields ride on the last."""
    out, budget = delta.output, max(max_bytes - _MESSAGE_OVERHEAD, 1)
    message = pb.GenerateStreamResponse(request_id=delta.request_id, index=delta.index)
    message.prompt_logprobs.extend(_prompt_logprobs(out.prompt_logprobs))
    size = message.ByteSize()
    rows: list[tuple[str, object, int]] = [("attention", _row(r), r.num_bytes) for r in out.attention]
    rows += [("residuals", _residual(r), r.num_bytes) for r in out.residuals]
    rows += [("logit_lens", _lens(r), r.num_bytes) for r in out.lens]
    for name, row, num_bytes in rows:
        row_size = num_bytes + 64
        if size > 0 and size + row_size > budget:
            yield message
            message, size = pb.GenerateStreamResponse(request_id=delta.request_id, index=delta.index), 0
        getattr(message, name).append(row)
        size += row_size
    _set_tokens(message, out)
    _set_totals(message, delta.usage, delta.timings)
    yield message


def generate_response(whole: WholeResponse) -> pb.GenerateResponse:
    """A unary answer from the service's whole response: one Completion per index, the prompt's
    logprobs (completion 0 carries them) and the totals at the top."""
    response = pb.GenerateResponse(request_id=whole.request_id)
    for index, out in whole.completions:
        completion = response.completions.add(index=index)
        _set_tokens(completion, out)
        completion.attention.extend(_row(r) for r in out.attention)
        completion.residuals.extend(_residual(r) for r in out.residuals)
        completion.logit_lens.extend(_lens(r) for r in out.lens)
        response.prompt_logprobs.extend(_prompt_logprobs(out.prompt_logprobs))
    _set_totals(response, whole.usage, whole.timings)
    return response


def _set_tokens(message: pb.Completion | pb.GenerateStreamResponse, out: RequestOutput) -> None:
    """Token ids, text, logprobs and the finish fields, which a Completion and a stream message share."""
    message.token_ids.extend(out.token_ids)
    message.text = out.text
    message.logprobs.extend(_logprobs(out.token_ids, out.logprobs))
    if out.finish_reason is not None:
        _finish(message, out.finish_reason, out.stop_reason)


def _set_totals(
    message: pb.GenerateResponse | pb.GenerateStreamResponse, usage: Usage | None, timings: Timings | None
) -> None:
    if usage is not None:
        message.usage.CopyFrom(_usage(usage))
    if timings is not None:
        message.timings.CopyFrom(_timings(timings))


def server_info_response(info: ServerInfo) -> pb.GetServerInfoResponse:
    e, limits, load, d = info.engine, info.limits, info.load, info.defaults
    return pb.GetServerInfoResponse(
        version=info.version,
        batch_invariant=e.batch_invariant,
        determinism=e.determinism,
        model=e.model_name,
        limits=pb.ServerLimits(
            context_length=e.context_length,
            max_n=limits.max_n,
            max_stop_strings=limits.max_stop_strings,
            max_stop_string_chars=limits.max_stop_string_chars,
            max_logprobs=limits.max_logprobs,
            max_request_bytes=limits.max_request_bytes,
            max_response_bytes=limits.max_response_bytes,
            max_attention_bytes_per_request=limits.max_attention_bytes_per_request,
            attention_memory_budget_bytes=limits.attention_memory_budget,
            max_num_waiting=e.max_num_waiting,
            max_num_seqs=e.max_num_seqs,
        ),
        load=pb.ServerLoad(
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            kv_cache_usage=load.kv_cache_usage,
            kv_cache_free_blocks=load.num_free_blocks,
            attention_bytes_reserved=info.attention_bytes_reserved,
        ),
        default_sampling=pb.DefaultSampling(
            temperature=d.temperature,
            top_k=d.top_k,
            top_p=d.top_p,
            min_p=d.min_p,
            repetition_penalty=d.repetition_penalty,
            max_tokens=limits.default_max_tokens,
        ),
        kv_cache_blocks=e.kv_cache_blocks,
        kv_cache_block_size=e.kv_cache_block_size,
        kv_cache_bytes=e.kv_cache_bytes,
        tensor_parallel_size=e.tensor_parallel_size,
    )


async def abort_with(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    message = field_errors_message(error.field_errors) if error.field_errors else error.message
    await context.abort(STATUS[error.kind], message)


def _with_tool_calls(completion: pb.Completion, fmt: str) -> None:
    """A whole completion's calls parsed out of its text (the text keeps what is outside them)."""
    content, calls = parse_whole(completion.text, fmt)
    if not calls:
        return
    completion.text = content
    completion.tool_calls.extend(pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls)
    if completion.finish_reason == pb.FINISH_REASON_STOP:
        completion.finish_reason = pb.FINISH_REASON_TOOL_CALLS


def _stream_tool_calls(message: pb.GenerateStreamResponse, parser: ToolCallParser) -> None:
    """A stream message's text split into content and tool-call pieces (the same parser as unary)."""
    parsed = parser.feed(message.text)
    if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
        tail = parser.finish()
        parsed.content += tail.content
        parsed.calls += tail.calls
        if parser.calls and message.finish_reason == pb.FINISH_REASON_STOP:
            message.finish_reason = pb.FINISH_REASON_TOOL_CALLS
    message.text = parsed.content
    message.tool_calls.extend(
        pb.ToolCallDelta(index=c.index, id=c.id or "", name=c.name or "", arguments=c.arguments) for c in parsed.calls
    )


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        whole = WholeResponse(request.request_id)
        async for delta in self._deltas(request, context, whole_response=True):
            whole.add(delta)
        response = generate_response(whole)
        if parses_tool_calls(request):
            for completion in response.completions:
                _with_tool_calls(completion, self.service.rules.tool_format)
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        max_bytes = self.service.limits.max_response_bytes
        parsers: dict[int, ToolCallParser] = {}
        async for delta in self._deltas(request, context, whole_response=False):
            for message in stream_messages(delta, max_bytes):
                if parses_tool_calls(request):
                    parser = parsers.setdefault(delta.index, ToolCallParser(self.service.rules.tool_format))
                    _stream_tool_calls(message, parser)
                yield message

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            if request.HasField("text") == bool(request.messages):
                raise ServiceError(ErrorKind.INVALID_ARGUMENT, "input: set one of text or messages")
            if request.HasField("text"):
                prompt = Prompt("prompt", text=request.text)
            else:
                prompt = Prompt("messages", messages=_turns(request.messages))
            ids = await self.service.tokenize(prompt)
        except ServiceError as error:
            await abort_with(context, error)
            raise  # unreachable: abort raises
        return pb.TokenizeResponse(token_ids=ids, tokens=self.service.token_texts(ids))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
            info = self.service.info()
        except ServiceError as error:
            await abort_with(context, error)
            raise
        return pb.GetModelInfoResponse(
            name=info.model_name,
            architecture=info.architecture,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            dtype=info.dtype,
            device=info.device,
            num_layers=info.num_layers,
            num_heads=info.num_heads,
            num_kv_heads=info.num_kv_heads,
            layer_windows=info.layer_windows,
            hidden_size=info.hidden_size,
            kv_cache_blocks=info.kv_cache_blocks,
            kv_cache_block_size=info.kv_cache_block_size,
            kv_cache_bytes=info.kv_cache_bytes,
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        try:
            return server_info_response(self.service.server_info())
        except ServiceError as error:
            await abort_with(context, error)
            raise

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        try:
            self.service.abort(request.request_id, caller=context.peer())
        except ServiceError as error:
            await abort_with(context, error)
        return pb.AbortResponse()

    async def _deltas(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, *, whole_response: bool
    ) -> AsyncIterator[CompletionDelta]:
        try:
            checked = replace(generation_request(request), caller=context.peer())
            deltas = self.service.generate(checked, timeout_s=context.time_remaining(), whole_response=whole_response)
            context.add_done_callback(lambda ctx: _close_if_cancelled(ctx, deltas))
            async for delta in deltas:
                yield delta
        except ServiceError as error:
            await abort_with(context, error)
