"""What every front door does with a generation request, whatever its wire format.

    check (no tokenizing) -> refuse early if the queue is full -> build the prompt on a
    worker thread -> fit it (context, attention cap, response size) -> reserve attention
    memory -> admit n completions -> stream their outputs -> log one line

A door converts its wire message to a :class:`GenerationRequest`, iterates
:meth:`GenerationService.generate`, converts each :class:`CompletionDelta` back, and maps a
raised :class:`ServiceError`'s kind to its own status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import TYPE_CHECKING

from attnserve.server.api.attention_budget import AttentionBudget
from attnserve.server.api.errors import ErrorKind, ServiceError, not_ready, service_error
from attnserve.server.api.prompts import prompt_token_ids
from attnserve.server.api.records import (
    CheckedRequest,
    FieldError,
    GenerationRequest,
    Prompt,
    RequestInvalid,
    RequestLimits,
    SamplingDefaults,
    ServingRules,
)
from attnserve.server.api.tools import template_format
from attnserve.server.api.validation import check_messages, check_text, fit_prompt, validate
from attnserve.server.engine.errors import ConstraintError
from attnserve.server.engine.outputs import RequestOutput, Timings, Usage
from attnserve.server.engine.records import EngineInfo, EngineStats
from attnserve.server.engine.request import DEADLINE_SLACK_S, FinishReason, SamplingParams

if TYPE_CHECKING:
    from attnserve.server.engine.core import Engine, RequestStream
    from attnserve.server.metrics import Metrics

log = logging.getLogger("attnserve.requests")
_SEED_STRIDE = 0x9E3779B97F4A7C15  # completion i of a seeded request draws from seed + i * this


@dataclass
class CompletionDelta:
    """One engine output of completion ``index``; the request's last delta carries the totals."""

    request_id: str
    index: int
    output: RequestOutput
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass
class WholeResponse:
    """A request's completions gathered whole, for a door that answers with one message (both doors'
    unary answers): each completion's outputs merged in order, and the totals from the last delta."""

    request_id: str
    outputs: dict[int, RequestOutput] = field(default_factory=dict)  # completion index -> its whole output
    usage: Usage | None = None
    timings: Timings | None = None

    def add(self, delta: CompletionDelta) -> None:
        self.request_id = delta.request_id
        self.outputs.setdefault(delta.index, RequestOutput(delta.request_id)).extend(delta.output)
        self.usage = delta.usage or self.usage
        self.timings = delta.timings or self.timings

    @property
    def completions(self) -> list[tuple[int, RequestOutput]]:
        """(index, whole output) in index order."""
        return sorted(self.outputs.items())


@dataclass(frozen=True)
class ServerInfo:
    version: str
    engine: EngineInfo
    load: EngineStats
    limits: RequestLimits
    defaults: SamplingDefaults
    attention_bytes_reserved: int


class GenerationService:
    """Created before the model is loaded (the doors bind first); answers UNAVAILABLE until
    ``attach()`` hands it the warm engine."""

    def __init__(
        self, metrics: Metrics, limits: RequestLimits | None = None, defaults: Mapping[str, float] | None = None
    ) -> None:
        self.metrics = metrics
        self.limits = limits or RequestLimits()
        self._default_overrides = dict(defaults or {})  # from flags: win over the model's own
        self._engine: Engine | None = None
        self._rules: ServingRules | None = None
        self.attention_budget = AttentionBudget(self.limits.attention_memory_budget)
        self._in_flight: dict[str, _InFlight] = {}  # request id -> its caller and completions
        # Templating and tokenizing run here, never on the event loop: a long prompt must not
        # stall the other streams or the health check.
        self._tokenizers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="attnserve-tokenize")
        # Constraint compiling has its own threads: a slow grammar must not hold up tokenizing.
        self._compilers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="attnserve-grammar")

    def attach(self, engine: Engine) -> None:
        info = engine.info()
        defaults = SamplingDefaults().overridden(info.generation_defaults).overridden(self._default_overrides)
        tool_format = template_format(getattr(engine.tokenizer, "chat_template", None))
        self._rules = ServingRules(info, self.limits, defaults, tool_format=tool_format)
        self._engine = engine
        log.info("sampling defaults: %s", defaults)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise not_ready()
        return self._engine

    @property
    def rules(self) -> ServingRules:
        if self._rules is None:
            raise not_ready()
        return self._rules

    def info(self) -> EngineInfo:
        return self.rules.facts

    def server_info(self) -> ServerInfo:
        rules = self.rules
        return ServerInfo(
            version=_version(),
            engine=rules.facts,
            load=self.engine.stats(),
            limits=rules.limits,
            defaults=rules.defaults,
            attention_bytes_reserved=self.attention_budget.reserved,
        )

    # ---------------------------------------------------------------- generate
    async def generate(
        self, request: GenerationRequest, *, timeout_s: float | None, whole_response: bool
    ) -> AsyncIterator[CompletionDelta]:
        """Deltas of the request's completions until each has finished. Raises ServiceError for any failure.

        ``whole_response``: the door answers with one message (unary), so its size is checked up front.
        """
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        outcome = _Outcome(request_id, started)
        reserved = 0
        try:
            checked = self._check(request)
            if checked.params.constraint is not None:
                checked = await self._compile(checked, request)
            prompt_ids = await self._build_prompt(checked.prompt)
            outcome.prompt_tokens = len(prompt_ids)
            fitted = fit_prompt(checked, len(prompt_ids), self.rules, whole_response=whole_response)
            if isinstance(fitted, list):
                raise RequestInvalid(fitted)
            reserved = self._reserve_attention(fitted.num_payload_bytes, checked.n, whole_response)
            streams = self._admit(request_id, request.caller, prompt_ids, fitted.params, checked, timeout_s)
            outcome.submitted = True
            async with contextlib.aclosing(_merge(request_id, streams, len(prompt_ids))) as deltas:
                async for delta in deltas:  # closed however this generator ends: the streams abort at once
                    outcome.record(delta)
                    _raise_if_cut_short(request_id, delta.output)
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: the streams are aborted
            # (GeneratorExit: cancelled while this generator waited at a yield, then closed by the door.)
            # gRPC cancels the handler when the client's deadline passes: that is a deadline, not a cancel.
            late = timeout_s is not None and time.monotonic() - started >= timeout_s - DEADLINE_SLACK_S
            outcome.log("DEADLINE_EXCEEDED" if late else "CANCELLED")
            raise
        except Exception as exc:
            error = service_error(exc)
            if not outcome.submitted:
                self.metrics.on_rejected(error.metric_reason)
            if error.kind is ErrorKind.INTERNAL and exc is not error:
                log.exception("request %s: unexpected error", request_id)
            outcome.log(error.kind.name)
            raise error from exc
        else:
            outcome.log("OK")
        finally:
            if outcome.submitted:  # never another request's entry (a duplicate id is refused before it is made)
                self._in_flight.pop(request_id, None)
            if reserved:
                self.attention_budget.release(reserved)

    def _check(self, request: GenerationRequest) -> CheckedRequest:
        """The cheap checks, then the queue: a refusal costs no templating or tokenizing."""
        checked = validate(request, self.rules)
        if isinstance(checked, list):
            raise RequestInvalid(checked)
        if self.engine.waiting_room() < checked.n:
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"the waiting queue is full ({self.rules.facts.max_num_waiting} requests); retry later",
                metric_reason="queue_full",
            )
        return checked

    async def _compile(self, checked: CheckedRequest, request: GenerationRequest) -> CheckedRequest:
        """The constraint compiled (or found in the cache) on a worker thread, within a time bound:
        a hostile schema costs its sender a 400, never the event loop or the engine a stall."""
        constraint = checked.params.constraint
        assert constraint is not None
        name = request.constraint.field if request.constraint is not None else "tools"  # or a forced tool call's
        limit = self.limits.max_constraint_compile_s
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._compilers, self.engine.grammars.compile, constraint)
        try:
            grammar = await asyncio.wait_for(job, limit)
        except TimeoutError:
            raise RequestInvalid(
                [FieldError(name, None, f"compiling this constraint took longer than {limit:g} s; simplify it")]
            ) from None
        except ConstraintError as exc:
            raise RequestInvalid([FieldError(name, None, f"cannot be compiled: {exc}")]) from exc
        params = replace(checked.params, constraint=replace(constraint, grammar=grammar))
        return replace(checked, params=params)

    async def _build_prompt(self, prompt: Prompt) -> list[int]:
        tokenizer = self.engine.tokenizer
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizers, prompt_token_ids, tokenizer, prompt)

    def _reserve_attention(self, size: int, n: int, whole_response: bool) -> int:
        """Reserve what the request asked to see (attention, residuals, lens: ``size`` bytes) against
        the server's attention memory; 0 if it asked for none."""
        if not size:
            return 0
        # A whole response holds everything at once; a stream holds at most its backlog bound.
        held = size if whole_response else min(size, n * self.rules.facts.max_stream_backlog_bytes)
        if not self.attention_budget.try_reserve(held):
            budget = self.attention_budget
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"attention: the server's attention memory ({budget.capacity:,} bytes) is in use "
                f"({budget.reserved:,} reserved); this request needs {held:,}: retry later, or ask for less "
                "(fewer layers, a head reduction, no prompt rows, fewer tokens, or stream it)",
            )
        return held

    def _admit(
        self,
        request_id: str,
        caller: str,
        prompt_ids: list[int],
        params: SamplingParams,
        checked: CheckedRequest,
        timeout_s: float | None,
    ) -> list[RequestStream]:
        if request_id in self._in_flight:
            raise ServiceError(ErrorKind.ALREADY_EXISTS, f"request_id: {request_id!r} is already in flight")
        engine, n = self.engine, checked.n
        ids = [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]
        self._in_flight[request_id] = _InFlight(caller, ids)
        streams: list[RequestStream] = []
        try:
            for i, engine_id in enumerate(ids):
                streams.append(
                    engine.add_request(
                        prompt_ids,
                        _completion_params(params, i),
                        request_id=engine_id,
                        timeout_s=timeout_s,
                        priority=checked.priority,
                        shares_prompt_with=ids[0] if i else None,
                    )
                )
        except Exception:
            for stream in streams:
                engine.abort(stream.request_id)
            del self._in_flight[request_id]
            raise
        return streams

    # -------------------------------------------------------------- the rest
    def abort(self, request_id: str, caller: str) -> None:
        """End a request in flight (every completion) that ``caller`` sent. Raises ServiceError NOT_FOUND
        if there is none: another caller's request is not there for this one, and is not revealed."""
        entry = self._in_flight.get(request_id)
        if entry is None or entry.caller != caller:
            raise ServiceError(
                ErrorKind.NOT_FOUND, f"request_id: no request {request_id!r} of this caller is in flight"
            )
        for engine_id in entry.engine_ids:
            self.engine.abort(engine_id, FinishReason.ABORT)

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """The ids Generate would use for this prompt (same helper, same special tokens)."""
        try:
            errors = check_messages(prompt.messages) if prompt.kind == "messages" else []
            if errors or (errors := check_text(prompt, self.rules.facts)):
                raise RequestInvalid(errors)
            return await self._build_prompt(prompt)
        except Exception as exc:
            raise service_error(exc) from exc

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        tokenizer = self.engine.tokenizer
        return [tokenizer.token_text(i) for i in token_ids]

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        tokenizer = self.engine.tokenizer
        return [tokenizer.token_bytes(i) for i in token_ids]

    def close(self) -> None:
        self._tokenizers.shutdown(wait=False, cancel_futures=True)
        self._compilers.shutdown(wait=False, cancel_futures=True)


def _completion_params(params: SamplingParams, index: int) -> SamplingParams:
    """Completion 0 is the request as asked; the others draw their own samples and skip what
    belongs to the prompt (its attention rows and logprobs come once, with completion 0)."""
    if index == 0:
        return params
    seed = None if params.seed is None else (params.seed + index * _SEED_STRIDE) % (1 << 64)
    attention = params.attention and replace(params.attention, include_prompt=False)
    return replace(params, seed=seed, attention=attention, prompt_logprobs=None)


def _raise_if_cut_short(request_id: str, out: RequestOutput) -> None:
    """A completion that did not end on a stop condition is not an answer: say why, as an error."""
    reason = out.finish_reason
    if reason is None or reason.is_complete:
        return
    if reason is FinishReason.ERROR:
        log.error("request %s failed in the engine: %s", request_id, out.error)
    raise ServiceError(*_CUT_SHORT[reason](request_id))


_CUT_SHORT = {
    FinishReason.DEADLINE: lambda rid: (
        ErrorKind.DEADLINE_EXCEEDED,
        f"request {rid}: the deadline passed before generation finished",
    ),
    FinishReason.ERROR: lambda rid: (ErrorKind.INTERNAL, f"request {rid}: the model step failed; see the server log"),
    FinishReason.ABORT: lambda rid: (ErrorKind.ABORTED, f"request {rid}: ended by an Abort call"),
    FinishReason.SHUTDOWN: lambda rid: (
        ErrorKind.UNAVAILABLE,
        f"request {rid}: the server shut down before generation finished (the output so far is incomplete); retry",
    ),
    FinishReason.STALLED: lambda rid: (
        ErrorKind.RESOURCE_EXHAUSTED,
        f"request {rid}: the stream was not read for too long while the server held its output; ended",
    ),
}


async def _merge(
    request_id: str, streams: list[RequestStream], num_prompt_tokens: int
) -> AsyncIterator[CompletionDelta]:
    """The completions' outputs as they come, one pending read per stream (so a reader that falls
    behind holds every stream back), with the totals on the last delta."""
    pending: dict[asyncio.Future[RequestOutput], int] = {}
    iterators = [stream.__aiter__() for stream in streams]
    finished: list[RequestOutput] = []

    def read(index: int) -> None:
        pending[asyncio.ensure_future(anext(iterators[index]))] = index

    for index in range(len(streams)):
        read(index)
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                index = pending.pop(future)
                out = future.result()
                delta = CompletionDelta(request_id, index, out)
                if out.finished:
                    finished.append(out)
                    if len(finished) == len(streams):
                        delta.usage, delta.timings = _totals(finished, num_prompt_tokens)
                else:
                    read(index)
                yield delta
    finally:
        for future in pending:
            future.cancel()
        for iterator in iterators:
            with contextlib.suppress(Exception):
                await iterator.aclose()  # type: ignore[attr-defined]


def _totals(finished: list[RequestOutput], num_prompt_tokens: int) -> tuple[Usage, Timings | None]:
    usages = [out.usage for out in finished if out.usage is not None]
    timings = [out.timings for out in finished if out.timings is not None]
    usage = Usage(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=max((u.cached_tokens for u in usages), default=0),
    )
    if not timings:
        return usage, None
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    return usage, Timings(
        queue_s=min(t.queue_s for t in timings),
        ttft_s=min(ttfts) if ttfts else None,
        total_s=max(t.total_s for t in timings),
    )


@dataclass(frozen=True)
class _InFlight:
    caller: str
    engine_ids: list[str]


class _Outcome:
    """What one line of log needs about a request."""

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id, self.started = request_id, started
        self.submitted = False
        self.finish: str = "-"
        self.usage: Usage | None = None
        self.ttft_s: float | None = None
        self.prompt_tokens: int | None = None  # known once tokenized
        self.completion_tokens = 0  # delivered so far: what a request cut short did generate

    def record(self, delta: CompletionDelta) -> None:
        self.completion_tokens += len(delta.output.token_ids)
        if delta.output.finish_reason is not None:
            self.finish = delta.output.finish_reason.value
        if delta.usage is not None:
            self.usage = delta.usage
            self.ttft_s = delta.timings.ttft_s if delta.timings else None

    def log(self, status: str) -> None:
        u = self.usage
        log.info(
            "request_id=%s status=%s finish=%s prompt_tokens=%s completion_tokens=%s cached_tokens=%s "
            "ttft_s=%s total_s=%.3f",
            log_safe(self.request_id),  # a refused id is logged too: it must not end or fake a line
            status,
            self.finish,
            u.prompt_tokens if u else (self.prompt_tokens if self.prompt_tokens is not None else "-"),
            u.completion_tokens if u else self.completion_tokens,
            u.cached_tokens if u else "-",
            f"{self.ttft_s:.3f}" if self.ttft_s is not None else "-",
            time.monotonic() - self.started,
        )


def log_safe(text: str) -> str:
    """``text`` with everything but printable non-space ASCII escaped (backslash included), so a
    caller's string can neither break a log line nor pass for another field."""
    return "".join(c if "!" <= c <= "~" and c != "\\" else _escape(c) for c in text)


def _escape(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" if ord(c) < 65536 else f"\\U{ord(c):08x}"


def _version() -> str:
    try:
        return metadata.version("attnserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"
