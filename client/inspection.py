"""Look inside and steer from the client: steering vectors, head ablations, and residual vectors as numbers.

ResidualVector.values holds hidden_size little-endian float32 (or float16) values; GetModelInfo's
hidden_size is the length a steering vector must have. Only the standard library.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from attnserve.v1 import generate_pb2 as pb

POINTS = {
    "resid_pre": pb.RESIDUAL_POINT_RESID_PRE,
    "attn_out": pb.RESIDUAL_POINT_ATTN_OUT,
    "resid_mid": pb.RESIDUAL_POINT_RESID_MID,
    "mlp_out": pb.RESIDUAL_POINT_MLP_OUT,
    "resid_post": pb.RESIDUAL_POINT_RESID_POST,
}
POINT_NAMES = {value: name for name, value in POINTS.items()}
POSITIONS = {
    "all": pb.INTERVENTION_POSITIONS_ALL,
    "prompt": pb.INTERVENTION_POSITIONS_PROMPT,
    "generated": pb.INTERVENTION_POSITIONS_GENERATED,
}


@dataclass(frozen=True)
class Steer:
    """Add ``scale * vector`` to the residual stream at ``point`` of ``layer`` on ``positions``."""

    layer: int
    vector: Sequence[float]
    scale: float = 1.0
    point: str = "resid_pre"  # resid_pre, resid_mid or resid_post
    positions: str = "all"  # all, prompt or generated

    def message(self) -> pb.SteeringVector:
        return pb.SteeringVector(
            layer=self.layer,
            point=POINTS[self.point],
            vector=struct.pack(f"<{len(self.vector)}f", *self.vector),
            scale=self.scale,
            positions=POSITIONS[self.positions],
        )


@dataclass(frozen=True)
class Ablate:
    """Multiply the outputs of ``heads`` at ``layer`` by ``scale`` (0: remove them)."""

    layer: int
    heads: Sequence[int]
    scale: float = 0.0

    def message(self) -> pb.HeadAblation:
        return pb.HeadAblation(layer=self.layer, heads=list(self.heads), scale=self.scale)


def residual_values(vector: pb.ResidualVector) -> list[float]:
    """A residual vector's values as floats."""
    code, size = ("f", 4) if vector.dtype in (pb.WEIGHTS_DTYPE_FLOAT32, pb.WEIGHTS_DTYPE_UNSPECIFIED) else ("e", 2)
    return list(struct.unpack(f"<{len(vector.values) // size}{code}", vector.values))
