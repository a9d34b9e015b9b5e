"""Fixtures shared by the suite: a tiny random model, and the real default model for e2e tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from attnserve.model.fetch import default_model_path
from attnserve.model.loader import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path(os.environ.get("ATTNSERVE_TEST_MODEL", REPO / default_model_path()))


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """The `tiny` named shape with seeded random weights, float32."""
    torch.manual_seed(0)
    return load_model("dummy:tiny", dtype=torch.float32)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    if not DEFAULT_MODEL.is_file():
        pytest.fail(f"default model missing at {DEFAULT_MODEL}: run `make model` (make test does it)")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def smollm_f32(default_gguf: Path) -> LoadedModel:
    return load_model(default_gguf, dtype=torch.float32)
