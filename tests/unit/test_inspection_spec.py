"""Inspection requests checked and sized before any work (server/api/inspection.py), no server needed."""

from __future__ import annotations

import dataclasses

from attnserve.server.api import inspection
from attnserve.server.api.inspection import AblationSpec, InspectionSpec, LensSpec, ResidualSpec, SteeringSpec
from attnserve.server.api.records import CheckedRequest, GenerationRequest, RequestLimits, ServingRules
from attnserve.server.api.validation import fit_prompt, validate
from attnserve.server.engine.request import SteerPositions, WeightsDtype
from tests.server.test_serving import INFO

RULES = ServingRules(INFO, RequestLimits(max_attention_bytes_per_request=1 << 20))


def _checked(spec: InspectionSpec, **fields: object) -> CheckedRequest:
    checked = validate(GenerationRequest(token_ids=[1, 2, 3], inspection=spec, **fields), RULES)  # type: ignore[arg-type]
    assert isinstance(checked, CheckedRequest), checked
    return checked


def test_a_checked_spec_becomes_the_engines_options() -> None:
    vector = inspection.float32_bytes([0.5] * INFO.hidden_size)
    spec = InspectionSpec(
        residuals=ResidualSpec(["resid_post", "resid_pre", "resid_pre"], [-1, 0], dtype="float16"),
        logit_lens=LensSpec([1, -1], top_k=3),
        steering=[SteeringSpec(-1, vector, point="resid_mid", scale=2.0, positions="generated")],
        ablations=[AblationSpec(0, [3, 1, 3])],
    )
    params = _checked(spec).params
    assert params.residuals is not None and params.residuals.points == ("resid_pre", "resid_post")
    assert params.residuals.layers == (0, 1) and params.residuals.dtype is WeightsDtype.FLOAT16
    assert params.logit_lens is not None and params.logit_lens.layers == (1,) and params.logit_lens.top_k == 3
    assert params.interventions is not None
    steer = params.interventions.steering[0]
    assert (steer.layer, steer.point, steer.scale, steer.positions) == (1, "resid_mid", 2.0, SteerPositions.GENERATED)
    assert params.interventions.ablations[0].heads == (1, 3)
    assert params.kv_salt and params.kv_salt != dataclasses.replace(params, interventions=None).kv_salt


def test_every_bad_field_is_named_with_its_limit() -> None:
    hidden = INFO.hidden_size
    spec = InspectionSpec(
        residuals=ResidualSpec(["resid_pre", "hook_q"], [0, 7], dtype="bfloat16"),
        logit_lens=LensSpec([], top_k=0),
        steering=[
            SteeringSpec(0, inspection.float32_bytes([1.0] * (hidden - 1))),
            SteeringSpec(0, inspection.float32_bytes([1.0] * (hidden - 1) + [float("inf")]), point="mlp_out"),
            SteeringSpec(0, inspection.float32_bytes([1.0] * hidden), positions="sometimes", scale=float("nan")),
        ],
        ablations=[AblationSpec(5, [], scale=float("inf")), AblationSpec(0, [INFO.num_heads])],
    )
    errors = validate(GenerationRequest(token_ids=[1, 2], inspection=spec), RULES)
    assert isinstance(errors, list)
    named = {e.field for e in errors}
    assert named >= {
        "residuals.points[1]",
        "residuals.layers[1]",
        "residuals.dtype",
        "logit_lens.layers",
        "logit_lens.top_k",
        "steering[0].vector",
        "steering[1].vector[63]",
        "steering[1].point",
        "steering[2].positions",
        "steering[2].scale",
        "ablations[0].layer",
        "ablations[0].heads",
        "ablations[0].scale",
        "ablations[1].heads[0]",
    }
    too_many = InspectionSpec(steering=[SteeringSpec(0, inspection.float32_bytes([1.0] * hidden))] * 33)
    assert {e.field for e in validate(GenerationRequest(token_ids=[1], inspection=too_many), RULES)} == {"steering"}


def test_reads_are_sized_before_work_against_the_per_request_cap() -> None:
    every = InspectionSpec(residuals=ResidualSpec(list(inspection.RESIDUAL_POINTS), [0, 1], include_prompt=True))
    checked = _checked(every, max_tokens=200)
    # (200 generated + 499 prompt rows) x 5 points x 2 layers x 64 values x 4 bytes = 1.79 MB > 1 MiB
    errors = fit_prompt(checked, 500, RULES, whole_response=False)
    assert isinstance(errors, list) and errors[0].field == "residuals"
    assert "1,048,576" in errors[0].message and "fewer" in errors[0].message
    small = _checked(InspectionSpec(residuals=ResidualSpec(["resid_post"], [1])), max_tokens=200)
    assert not isinstance(fit_prompt(small, 500, RULES, whole_response=False), list)
    assert inspection.payload_bytes(small.params, 500, 1, INFO.hidden_size) == 200 * 64 * 4
