"""The native per-shape caches' capacities: set before the first oneDNN call, an operator's value kept."""

from __future__ import annotations

import pytest

from attnserve.model.native_caches import CAPACITY_VARIABLES, DEFAULT_CAPACITY, cap_primitive_caches


def test_both_caches_are_capped_unless_the_environment_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CAPACITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cap_primitive_caches() == dict.fromkeys(CAPACITY_VARIABLES, str(DEFAULT_CAPACITY))
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "1024")  # an operator's choice wins
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert cap_primitive_caches(8) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8", "LRU_CACHE_CAPACITY": "1024"}


def test_a_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        cap_primitive_caches(0)
