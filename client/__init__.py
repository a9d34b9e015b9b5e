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
from attnserve.client.inspection import Ablate, Steer, residual_values

__all__ = [
    "Ablate",
    "AbortedError",
    "AsyncClient",
    "AttnserveError",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "Steer",
    "UnauthenticatedError",
    "UnavailableError",
    "build_request",
    "residual_values",
    "row_array",
    "row_positions",
    "row_weights",
]
