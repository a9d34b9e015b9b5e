"""The gRPC face of the engine: validation, conversion and status codes.

The only module (with server/app.py) that sees generated protobuf types; the
engine works on plain dataclasses. Every error is mapped to a status in one
place, ``_status_of``.
"""

from __future__ import annotations

import array
import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from attnserve.v1 import generate_pb2 as pb
from attnserve.v1 import generate_pb2_grpc as pb_grpc
from server.engine import Engine, EngineStoppedError
from server.metrics import Metrics
from server.outputs import RequestOutput
from server.request import AttentionOptions, FinishReason, HeadReduction, SamplingParams
from server.scheduler import QueueFullError

log = logging.getLogger("attnserve.requests")

CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 256
MAX_REQUEST_ID_CHARS = 256


class ServiceError(Exception):
    """An error with its gRPC status code; the message names the field and the limit."""

    code = grpc.StatusCode.INTERNAL
    metric_reason = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    metric_reason = "invalid_argument"


@dataclass(frozen=True)
class Limits:
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_logprobs: int = 20


_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_REDUCTION = {
    pb.HEAD_REDUCTION_UNSPECIFIED: HeadReduction.MEAN,
    pb.HEAD_REDUCTION_NONE: HeadReduction.NONE,
    pb.HEAD_REDUCTION_MEAN: HeadReduction.MEAN,
    pb.HEAD_REDUCTION_MAX: HeadReduction.MAX,
}


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status code, message, metric reason) for any exception a request can raise."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.metric_reason
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "queue_full"
    if isinstance(exc, EngineStoppedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc), "unavailable"
    if isinstance(exc, ValueError):  # the engine's own checks (prompt too long, id in use, ...)
        code = grpc.StatusCode.ALREADY_EXISTS if "already in use" in str(exc) else grpc.StatusCode.INVALID_ARGUMENT
        return code, str(exc), "invalid_argument"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log", "error"


class NotReady(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    metric_reason = "unavailable"


class GeneratorServicer(pb_grpc.GeneratorServicer):
    """Registered before the model is loaded (gRPC wants every service before start);
    answers UNAVAILABLE until ``attach()`` hands it the warm engine."""

    def __init__(self, metrics: Metrics, *, limits: Limits | None = None) -> None:
        self.metrics = metrics
        self.limits = limits or Limits()
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.loaded.config
        self.model_name = engine.loaded.config.name

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotReady("the server is still loading the model; retry shortly")
        return self._engine

    # ------------------------------------------------------------------- RPCs
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        response = pb.GenerateResponse()
        async for out in self._run(request, context):
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
        async for out in self._run(request, context):
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
        try:
            _ = self.engine
            which = request.WhichOneof("input")
            if which == "messages":
                text = self._render_chat(request.messages, "messages")
            elif which == "text":
                text = request.text
            else:
                raise InvalidArgument("input: set one of text or messages")
            ids = self.tokenizer.encode(text)
            return pb.TokenizeResponse(token_ids=ids, tokens=[self.tokenizer.token_text(i) for i in ids])
        except Exception as exc:
            code, message, _ = _status_of(exc)
            await context.abort(code, message)
            raise  # unreachable

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if self._engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading the model; retry shortly")
        runner, c = self.engine.runner, self.config
        return pb.ModelInfo(
            name=self.model_name,
            architecture=c.architecture,
            context_length=self.engine.max_model_len,
            vocab_size=c.vocab_size,
            dtype=str(runner.model.dtype).removeprefix("torch."),
            device=str(runner.device),
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            kv_cache_blocks=runner.num_blocks,
            kv_cache_block_size=runner.block_size,
            kv_cache_bytes=runner.kv_cache.num_bytes,
        )

    # --------------------------------------------------------------- plumbing
    async def _run(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[RequestOutput]:
        """Validate, submit, stream outputs; every failure leaves as a status."""
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        last: RequestOutput | None = None
        submitted = False  # once in the engine, its observers count the outcome
        try:
            engine = self.engine
            if len(request_id) > MAX_REQUEST_ID_CHARS:
                raise InvalidArgument(f"request_id: {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
            prompt_ids, params = self._validate(request)
            remaining = context.time_remaining()
            stream = engine.add_request(prompt_ids, params, request_id=request_id, timeout_s=remaining)
            submitted = True
            async for out in stream:
                last = out
                if out.finish_reason is FinishReason.DEADLINE:
                    raise _Deadline(request_id)
                if out.finish_reason is FinishReason.ERROR:
                    log.error("request %s failed in the engine: %s", request_id, out.error)
                    raise _EngineFailure(request_id)
                yield out
        except asyncio.CancelledError:  # the client went away: the stream's exit aborted the request
            _log_request(request_id, "CANCELLED", last, started)
            raise
        except Exception as exc:
            code, message, reason = _status_of(exc)
            if not submitted:
                self.metrics.on_rejected(reason)
            if code is grpc.StatusCode.INTERNAL and not isinstance(exc, _EngineFailure):
                log.exception("request %s: unexpected error", request_id)
            _log_request(request_id, code.name, last, started)
            await context.abort(code, message)
        else:
            _log_request(request_id, "OK", last, started)

    def _validate(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        if request.model and request.model != self.model_name:
            raise InvalidArgument(
                f"model: {request.model!r} is not served here; this server serves "
                f"{self.model_name!r} (or leave model empty)"
            )
        vocab = self.config.vocab_size
        which = request.WhichOneof("input")
        if which == "prompt":
            if not request.prompt:
                raise InvalidArgument("prompt: must not be empty")
            prompt_ids = self.tokenizer.encode(request.prompt)
        elif which == "messages":
            prompt_ids = self.tokenizer.encode(
                self._render_chat(request.messages, "messages"), add_special_tokens=False
            )
        elif which == "token_ids":
            prompt_ids = list(request.token_ids.ids)
            if not prompt_ids:
                raise InvalidArgument("token_ids.ids: must not be empty")
            for i, t in enumerate(prompt_ids):
                if not 0 <= t < vocab:
                    raise InvalidArgument(f"token_ids.ids[{i}]: {t} is outside the vocabulary [0, {vocab})")
        else:
            raise InvalidArgument("input: set one of prompt, messages or token_ids")
        if not prompt_ids:
            raise InvalidArgument(f"{which}: tokenizes to no tokens")
        context_len = self.engine.max_model_len
        if len(prompt_ids) >= context_len:
            raise InvalidArgument(
                f"{which}: the prompt has {len(prompt_ids)} tokens; the context length is "
                f"{context_len}, so a prompt may have at most {context_len - 1}"
            )
        room = context_len - len(prompt_ids)

        s, st = request.sampling, request.stopping
        temperature = s.temperature if s.HasField("temperature") else 1.0
        _check(
            math.isfinite(temperature) and temperature >= 0,
            "sampling.temperature",
            f"must be a finite number >= 0, got {temperature}",
        )
        _check(s.top_k >= 0, "sampling.top_k", f"must be >= 0 (0 = off), got {s.top_k}")
        top_p = s.top_p if s.HasField("top_p") else 1.0
        _check(0 < top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {top_p}")
        min_p = s.min_p if s.HasField("min_p") else 0.0
        _check(0 <= min_p <= 1, "sampling.min_p", f"must be in [0, 1], got {min_p}")
        penalty = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
        _check(
            math.isfinite(penalty) and penalty > 0,
            "sampling.repetition_penalty",
            f"must be a finite number > 0 (1 = off), got {penalty}",
        )

        if st.HasField("max_tokens"):
            max_tokens = st.max_tokens
            _check(max_tokens >= 1, "stopping.max_tokens", "must be >= 1")
            _check(
                max_tokens <= room,
                "stopping.max_tokens",
                f"{max_tokens} does not fit: the context length is {context_len} and the prompt has "
                f"{len(prompt_ids)} tokens, so at most {room}",
            )
        else:
            max_tokens = min(DEFAULT_MAX_TOKENS, room)
        lim = self.limits
        _check(
            len(st.stop) <= lim.max_stop_strings,
            "stopping.stop",
            f"{len(st.stop)} stop strings; the limit is {lim.max_stop_strings}",
        )
        for i, stop in enumerate(st.stop):
            _check(
                0 < len(stop) <= lim.max_stop_string_chars,
                f"stopping.stop[{i}]",
                f"must have 1 to {lim.max_stop_string_chars} characters, has {len(stop)}",
            )
        for i, t in enumerate(st.stop_token_ids):
            _check(0 <= t < vocab, f"stopping.stop_token_ids[{i}]", f"{t} is outside the vocabulary [0, {vocab})")

        logprobs = None
        if request.HasField("logprobs"):
            logprobs = request.logprobs.top_n
            _check(
                logprobs <= lim.max_logprobs, "logprobs.top_n", f"{logprobs} exceeds the limit of {lim.max_logprobs}"
            )

        attention = None
        if request.HasField("attention"):
            a = request.attention
            num_layers = self.config.num_layers
            _check(len(a.layers) > 0, "attention.layers", f"name at least one layer (0..{num_layers - 1}, or -1)")
            layers = []
            for i, layer in enumerate(a.layers):
                _check(
                    -num_layers <= layer < num_layers,
                    f"attention.layers[{i}]",
                    f"layer {layer} does not exist: the model has {num_layers} layers "
                    f"(0..{num_layers - 1}, or -{num_layers}..-1)",
                )
                layers.append(layer % num_layers)
            _check(
                a.head_reduction in _REDUCTION,
                "attention.head_reduction",
                f"unknown value {a.head_reduction} (use NONE, MEAN or MAX)",
            )
            attention = AttentionOptions(tuple(sorted(set(layers))), _REDUCTION[a.head_reduction], a.include_prompt)

        params = SamplingParams(
            temperature=temperature,
            top_k=s.top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=penalty,
            seed=s.seed if s.HasField("seed") else None,
            max_tokens=max_tokens,
            stop=tuple(st.stop),
            stop_token_ids=tuple(st.stop_token_ids),
            ignore_eos=st.ignore_eos,
            logprobs=logprobs,
            attention=attention,
        )
        return prompt_ids, params

    def _render_chat(self, messages: pb.ChatMessages, field: str) -> str:
        if not messages.messages:
            raise InvalidArgument(f"{field}.messages: must hold at least one message")
        for i, m in enumerate(messages.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidArgument(
                    f"{field}.messages[{i}].role: unknown role {m.role!r} (use {', '.join(CHAT_ROLES)})"
                )
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages.messages]
            )
        except Exception as exc:  # a template's raise_exception(): the conversation breaks its rules
            raise InvalidArgument(f"{field}: the chat template rejects this conversation: {exc}") from exc


class _Deadline(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    metric_reason = "deadline"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id}: the deadline passed before generation finished")


class _EngineFailure(ServiceError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id}: the model step failed; see the server log")


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidArgument(f"{field}: {message}")


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


def _log_request(request_id: str, status: str, last: RequestOutput | None, started: float) -> None:
    """One structured line per request at its end."""
    usage = last.usage if last is not None else None
    timings = last.timings if last is not None else None
    log.info(
        "request_id=%s status=%s finish=%s prompt_tokens=%s completion_tokens=%s cached_tokens=%s "
        "ttft_s=%s total_s=%.3f",
        request_id,
        status,
        last.finish_reason.value if last is not None and last.finish_reason else "-",
        usage.prompt_tokens if usage else "-",
        usage.completion_tokens if usage else "-",
        usage.cached_tokens if usage else "-",
        f"{timings.ttft_s:.3f}" if timings and timings.ttft_s is not None else "-",
        time.monotonic() - started,
    )
