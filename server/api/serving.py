"""What every front door does with a generation request, whatever its wire format:
check it, build its prompt, admit it to the engine, stream its outputs, log one line.

A door converts its wire message to a :class:`GenerationRequest`, iterates
:meth:`GenerationService.generate`, converts each :class:`RequestOutput` back, and maps a
raised :class:`ServiceError`'s kind to its own status.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from attnserve.server.api.errors import ErrorKind, ServiceError, not_ready, service_error
from attnserve.server.api.prompts import prompt_token_ids
from attnserve.server.api.validation import (
    GenerationRequest,
    Prompt,
    RequestInvalid,
    RequestLimits,
    check_messages,
    fit_prompt,
    validate,
)
from attnserve.server.engine.outputs import RequestOutput
from attnserve.server.engine.records import EngineInfo
from attnserve.server.engine.request import FinishReason

if TYPE_CHECKING:
    from attnserve.server.engine.core import Engine
    from attnserve.server.metrics import Metrics

log = logging.getLogger("attnserve.requests")


class GenerationService:
    """Created before the model is loaded (the doors bind first); answers UNAVAILABLE until
    ``attach()`` hands it the warm engine."""

    def __init__(self, metrics: Metrics, limits: RequestLimits | None = None) -> None:
        self.metrics = metrics
        self.limits = limits or RequestLimits()
        self._engine: Engine | None = None
        self._info: EngineInfo | None = None

    def attach(self, engine: Engine) -> None:
        self._info = engine.info()
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise not_ready()
        return self._engine

    def info(self) -> EngineInfo:
        if self._info is None:
            raise not_ready()
        return self._info

    async def generate(self, request: GenerationRequest, *, timeout_s: float | None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until its finished one. Raises ServiceError for any failure."""
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        last: RequestOutput | None = None
        submitted = False  # once in the engine, its observers count the outcome
        try:
            engine, info = self.engine, self.info()
            checked = validate(request, info, self.limits)
            if isinstance(checked, list):
                raise RequestInvalid(checked)
            prompt_ids = prompt_token_ids(engine.tokenizer, checked.prompt)
            params = fit_prompt(checked, len(prompt_ids), info)
            if isinstance(params, list):
                raise RequestInvalid(params)
            stream = engine.add_request(prompt_ids, params, request_id=request_id, timeout_s=timeout_s)
            submitted = True
            async for out in stream:
                last = out
                if out.finish_reason is FinishReason.DEADLINE:
                    raise ServiceError(
                        ErrorKind.DEADLINE_EXCEEDED,
                        f"request {request_id}: the deadline passed before generation finished",
                    )
                if out.finish_reason is FinishReason.ERROR:
                    log.error("request %s failed in the engine: %s", request_id, out.error)
                    raise ServiceError(
                        ErrorKind.INTERNAL, f"request {request_id}: the model step failed; see the server log"
                    )
                yield out
        except asyncio.CancelledError:  # the client went away: the stream's exit aborted the request
            _log_request(request_id, "CANCELLED", last, started)
            raise
        except Exception as exc:
            error = service_error(exc)
            if not submitted:
                self.metrics.on_rejected(error.kind.metric_reason)
            if error.kind is ErrorKind.INTERNAL and exc is not error:
                log.exception("request %s: unexpected error", request_id)
            _log_request(request_id, error.kind.name, last, started)
            raise error from exc
        else:
            _log_request(request_id, "OK", last, started)

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """The ids Generate would use for this prompt (same helper, same special tokens)."""
        try:
            engine = self.engine
            if prompt.kind == "messages" and (errors := check_messages(prompt.messages)):
                raise RequestInvalid(errors)
            return prompt_token_ids(engine.tokenizer, prompt)
        except Exception as exc:
            raise service_error(exc) from exc

    def token_texts(self, token_ids: list[int]) -> list[str]:
        tokenizer = self.engine.tokenizer
        return [tokenizer.token_text(i) for i in token_ids]


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
