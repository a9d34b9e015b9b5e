"""attnserve's Python client: grpc and the generated stubs only (no torch)."""

from attnserve.client.client import (
    AsyncClient,
    AttnserveError,
    CancelledError,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    build_request,
)

__all__ = [
    "AsyncClient",
    "AttnserveError",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "build_request",
]
