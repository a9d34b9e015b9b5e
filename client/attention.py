"""Attention weights as numbers: AttentionRow.weights holds little-endian float16 (or float32)
bytes of shape (num_heads, context_len), row-major. Only the standard library; numpy if you have it."""

from __future__ import annotations

import struct
from typing import Any

from attnserve.v1 import generate_pb2 as pb

_FORMATS = {
    pb.WEIGHTS_DTYPE_FLOAT16: ("e", 2),
    pb.WEIGHTS_DTYPE_UNSPECIFIED: ("e", 2),
    pb.WEIGHTS_DTYPE_FLOAT32: ("f", 4),
}


def row_weights(row: pb.AttentionRow) -> list[list[float]]:
    """The row's weights as a (num_heads, context_len) list of lists of floats."""
    code, size = _FORMATS[row.dtype]
    count = len(row.weights) // size
    if count != row.num_heads * row.context_len:
        raise ValueError(f"{len(row.weights)} bytes do not hold {row.num_heads} x {row.context_len} weights")
    flat = struct.unpack(f"<{count}{code}", row.weights)
    return [list(flat[h * row.context_len : (h + 1) * row.context_len]) for h in range(row.num_heads)]


def row_array(row: pb.AttentionRow) -> Any:
    """The row's weights as a float32 numpy array of shape (num_heads, context_len) (needs numpy)."""
    import numpy as np

    dtype = "<f4" if row.dtype == pb.WEIGHTS_DTYPE_FLOAT32 else "<f2"
    return np.frombuffer(row.weights, dtype=dtype).astype(np.float32).reshape(row.num_heads, row.context_len)
