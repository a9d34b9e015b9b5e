"""Why a request failed, in words every door shares; each door maps a kind to its own status.

A door catches :class:`ServiceError` (and the engine's own exceptions, through
:func:`service_error`) and turns ``kind`` into a gRPC status code or an HTTP status.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from attnserve.server.api.records import FieldError, RequestInvalid
from attnserve.server.engine.errors import DuplicateRequestError, EngineStoppedError, QueueFullError


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a full queue, the attention budget, a stalled reader
    UNAVAILABLE = "unavailable"  # loading, draining, or cut by shutdown: retry elsewhere or later
    ABORTED = "aborted"  # ended by an Abort call
    DEADLINE_EXCEEDED = "deadline"
    INTERNAL = "error"


class ServiceError(Exception):
    """``field_errors`` are set for INVALID_ARGUMENT from validation, so each door can name
    the fields in its own wire terms; ``message`` names them in neutral terms."""

    def __init__(
        self, kind: ErrorKind, message: str, field_errors: Sequence[FieldError] = (), *, metric_reason: str = ""
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field_errors = list(field_errors)
        self.metric_reason = metric_reason or kind.value  # the reason label of attnserve_request_failure_total


def not_ready() -> ServiceError:
    return ServiceError(ErrorKind.UNAVAILABLE, "the server is still loading the model; retry shortly")


def service_error(exc: BaseException) -> ServiceError:
    """The ServiceError for any exception a request can raise; unexpected ones are INTERNAL."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RequestInvalid):
        return ServiceError(ErrorKind.INVALID_ARGUMENT, str(exc), exc.errors)
    if isinstance(exc, DuplicateRequestError):
        return ServiceError(ErrorKind.ALREADY_EXISTS, str(exc))
    if isinstance(exc, QueueFullError):
        return ServiceError(ErrorKind.RESOURCE_EXHAUSTED, str(exc), metric_reason="queue_full")
    if isinstance(exc, EngineStoppedError):
        return ServiceError(ErrorKind.UNAVAILABLE, str(exc))
    if isinstance(exc, ValueError):  # the engine's guards (a prompt past the context, ...)
        return ServiceError(ErrorKind.INVALID_ARGUMENT, str(exc))
    return ServiceError(ErrorKind.INTERNAL, f"internal error ({type(exc).__name__}); see the server log")
