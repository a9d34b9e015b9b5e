"""attnserve's Python client: grpc and the generated stubs only (no torch)."""

from attnserve.client.attention import row_array, row_positions, row_weights
from attnserve.client.client import (
    AbortedError,
    AsyncClient,
    AttnserveError,
    CancelledError,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    build_request,
)

__all__ = [
    "AbortedError",
    "AsyncClient",
    "AttnserveError",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "build_request",
    "row_array",
    "row_positions",
    "row_weights",
]
