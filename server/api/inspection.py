"""Look inside and steer, as a door received it: residual reads, the logit lens, steering vectors and
head ablations. Checked against the model's shape and the limits, and sized, before any work.

Both doors convert their wire form into an :class:`InspectionSpec` (steering vectors as
little-endian float32 bytes); the checks here name each field and its limit, and
:func:`to_params` turns a checked spec into the engine's options.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from attnserve.server.engine.records import EngineInfo
from attnserve.server.engine.request import (
    HeadAblation,
    Interventions,
    LogitLens,
    ResidualReads,
    SamplingParams,
    Steering,
    SteerPositions,
    WeightsDtype,
)

# TransformerLens names of a layer's residual points, in forward order (model/hooks.py holds the same).
RESIDUAL_POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
STEERABLE_POINTS = ("resid_pre", "resid_mid", "resid_post")
STEER_POSITIONS = {p.value: p for p in SteerPositions}
MAX_STEERING_VECTORS = 32
MAX_ABLATIONS = 64
MAX_LENS_TOP_K = 20
MAX_STEERING_SCALE = 1e6


@dataclass(frozen=True)
class ResidualSpec:
    points: Sequence[str]
    layers: Sequence[int]
    include_prompt: bool = False
    dtype: str | None = None  # "float32" (None) or "float16"


@dataclass(frozen=True)
class LensSpec:
    layers: Sequence[int]
    top_k: int | None = None  # None: 5
    include_prompt: bool = False


@dataclass(frozen=True)
class SteeringSpec:
    layer: int
    vector: bytes  # little-endian float32
    point: str | None = None  # None: resid_pre
    scale: float | None = None  # None: 1
    positions: str | None = None  # None: all


@dataclass(frozen=True)
class AblationSpec:
    layer: int
    heads: Sequence[int]
    scale: float = 0.0


@dataclass(frozen=True)
class InspectionSpec:
    residuals: ResidualSpec | None = None
    logit_lens: LensSpec | None = None
    steering: Sequence[SteeringSpec] = ()
    ablations: Sequence[AblationSpec] = ()

    @property
    def is_empty(self) -> bool:
        return self.residuals is None and self.logit_lens is None and not self.steering and not self.ablations


def float32_bytes(values: Sequence[float]) -> bytes:
    """A JSON list of numbers as the wire's little-endian float32 bytes."""
    packed = array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _floats(vector: bytes) -> array:
    values = array("f")
    values.frombytes(vector)
    if sys.byteorder == "big":
        values.byteswap()
    return values


# ------------------------------------------------------------------ checks
Report = Callable[[bool, str, object, str], None]  # (ok, field, value, message): the caller's error list


def check(spec: InspectionSpec | None, facts: EngineInfo, report: Report) -> None:
    if spec is None:
        return
    layers = facts.num_layers

    def check_layers(name: str, values: Sequence[int]) -> None:
        report(len(values) > 0, f"{name}.layers", [], f"name at least one layer (0..{layers - 1}, or -1)")
        for i, layer in enumerate(values):
            report(
                -layers <= layer < layers,
                f"{name}.layers[{i}]",
                layer,
                f"layer {layer} does not exist: the model has {layers} layers (0..{layers - 1}, or -{layers}..-1)",
            )

    if (r := spec.residuals) is not None:
        check_layers("residuals", r.layers)
        report(len(r.points) > 0, "residuals.points", [], f"name at least one point ({', '.join(RESIDUAL_POINTS)})")
        for i, point in enumerate(r.points):
            report(point in RESIDUAL_POINTS, f"residuals.points[{i}]", point, f"use {', '.join(RESIDUAL_POINTS)}")
        report(r.dtype in (None, "float16", "float32"), "residuals.dtype", r.dtype, "use float32 or float16")
    if (lens := spec.logit_lens) is not None:
        check_layers("logit_lens", lens.layers)
        top = 5 if lens.top_k is None else lens.top_k
        report(1 <= top <= MAX_LENS_TOP_K, "logit_lens.top_k", top, f"must be 1 to {MAX_LENS_TOP_K}")
    report(
        len(spec.steering) <= MAX_STEERING_VECTORS,
        "steering",
        len(spec.steering),
        f"{len(spec.steering)} steering vectors; at most {MAX_STEERING_VECTORS}",
    )
    for i, s in enumerate(spec.steering[:MAX_STEERING_VECTORS]):
        _check_steering(i, s, facts, report)
    report(len(spec.ablations) <= MAX_ABLATIONS, "ablations", len(spec.ablations), f"at most {MAX_ABLATIONS} ablations")
    for i, a in enumerate(spec.ablations[:MAX_ABLATIONS]):
        name = f"ablations[{i}]"
        report(-layers <= a.layer < layers, f"{name}.layer", a.layer, f"the model has {layers} layers")
        report(len(a.heads) > 0, f"{name}.heads", [], "name at least one head")
        for j, head in enumerate(a.heads):
            report(
                0 <= head < facts.num_heads,
                f"{name}.heads[{j}]",
                head,
                f"head {head} does not exist: the model has {facts.num_heads} heads (0..{facts.num_heads - 1})",
            )
        report(math.isfinite(a.scale), f"{name}.scale", a.scale, "must be a finite number")


def _check_steering(i: int, s: SteeringSpec, facts: EngineInfo, report: Report) -> None:
    name, layers, hidden = f"steering[{i}]", facts.num_layers, facts.hidden_size
    report(-layers <= s.layer < layers, f"{name}.layer", s.layer, f"the model has {layers} layers")
    point = s.point or "resid_pre"
    report(point in STEERABLE_POINTS, f"{name}.point", point, f"steer at {', '.join(STEERABLE_POINTS)}")
    report(
        s.positions is None or s.positions in STEER_POSITIONS,
        f"{name}.positions",
        s.positions,
        f"use {', '.join(STEER_POSITIONS)}",
    )
    scale = 1.0 if s.scale is None else s.scale
    report(
        math.isfinite(scale) and abs(scale) <= MAX_STEERING_SCALE,
        f"{name}.scale",
        scale,
        f"must be finite, at most {MAX_STEERING_SCALE:g} in size",
    )
    if len(s.vector) != 4 * hidden:
        report(
            False,
            f"{name}.vector",
            f"{len(s.vector)} bytes",
            f"needs hidden_size = {hidden} float32 values ({4 * hidden} bytes), got {len(s.vector) / 4:g} values",
        )
        return
    values = _floats(s.vector)
    bad = next((k for k, v in enumerate(values) if not math.isfinite(v)), None)
    report(bad is None, f"{name}.vector[{bad}]", None if bad is None else values[bad], "every value must be finite")


# ------------------------------------------------------------------ conversion and size
def to_params(params: SamplingParams, spec: InspectionSpec | None, facts: EngineInfo) -> SamplingParams:
    """The checked spec as the engine's options on ``params``."""
    if spec is None or spec.is_empty:
        return params
    layers = facts.num_layers

    def normal(values: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted({v % layers for v in values}))

    residuals = lens = interventions = None
    if (r := spec.residuals) is not None:
        points = tuple(p for p in RESIDUAL_POINTS if p in set(r.points))
        dtype = WeightsDtype.FLOAT16 if r.dtype == "float16" else WeightsDtype.FLOAT32
        residuals = ResidualReads(points, normal(r.layers), r.include_prompt, dtype)
    if (g := spec.logit_lens) is not None:
        lens = LogitLens(normal(g.layers), 5 if g.top_k is None else g.top_k, g.include_prompt)
    if spec.steering or spec.ablations:
        interventions = Interventions(
            steering=tuple(
                Steering(
                    s.layer % layers,
                    s.point or "resid_pre",
                    bytes(s.vector),
                    1.0 if s.scale is None else s.scale,
                    STEER_POSITIONS[s.positions or "all"],
                )
                for s in spec.steering
            ),
            ablations=tuple(
                HeadAblation(a.layer % layers, tuple(sorted(set(a.heads))), a.scale) for a in spec.ablations
            ),
        )
    return replace(params, residuals=residuals, logit_lens=lens, interventions=interventions)


def payload_bytes(params: SamplingParams, num_prompt_tokens: int, n: int, hidden_size: int) -> int:
    """Bytes of residual vectors and lens rows the request can return: known before any work."""
    p, m = num_prompt_tokens, params.max_tokens
    total = 0
    if (r := params.residuals) is not None:
        rows = n * m + (p - 1 if r.include_prompt else 0)
        total += rows * len(r.points) * len(r.layers) * hidden_size * r.dtype.num_bytes
    if (lens := params.logit_lens) is not None:
        rows = n * m + (p - 1 if lens.include_prompt else 0)
        total += rows * len(lens.layers) * lens.top_k * 12
    return total


def describe(params: SamplingParams) -> str:
    parts = []
    if (r := params.residuals) is not None:
        parts.append(f"residuals: {len(r.points)} points x {len(r.layers)} layers, {r.dtype.num_bytes} bytes a value")
    if (lens := params.logit_lens) is not None:
        parts.append(f"logit lens: {len(lens.layers)} layers x top {lens.top_k}")
    return "; ".join(parts)
