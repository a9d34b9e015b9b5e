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
    """The row's weights as a (num_heads, context_len) list of lists of floats; for a top-k row
    (num_kept > 0), (num_heads, num_kept), largest first, their positions in row_positions(row)."""
    code, size = _FORMATS[row.dtype]
    width = row.num_spans or row.num_kept or row.context_len
    count = len(row.weights) // size
    if count != row.num_heads * width:
        raise ValueError(f"{len(row.weights)} bytes do not hold {row.num_heads} x {width} weights")
    flat = struct.unpack(f"<{count}{code}", row.weights)
    return [list(flat[h * width : (h + 1) * width]) for h in range(row.num_heads)]


def row_positions(row: pb.AttentionRow) -> list[list[int]]:
    """A top-k row's key positions, (num_heads, num_kept), in the order of its weights."""
    flat = struct.unpack(f"<{len(row.positions) // 4}i", row.positions)
    return [list(flat[h * row.num_kept : (h + 1) * row.num_kept]) for h in range(row.num_heads)]


def row_array(row: pb.AttentionRow) -> Any:
    """The row's weights as a float32 numpy array of shape (num_heads, context_len) (needs numpy)."""
    import numpy as np

    dtype = "<f4" if row.dtype == pb.WEIGHTS_DTYPE_FLOAT32 else "<f2"
    width = row.num_spans or row.num_kept or row.context_len
    return np.frombuffer(row.weights, dtype=dtype).astype(np.float32).reshape(row.num_heads, width)
