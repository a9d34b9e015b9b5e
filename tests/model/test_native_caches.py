"""The primitive-cache cap reaches oneDNN when set in-process after `import torch` (model/native_caches.py):
a future torch that read the variable at load time would silently undo the memory bound."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attnserve.model.native_caches import CAPACITY_VARIABLES

PROBE = """
import sys
import torch
from attnserve.model.native_caches import cap_primitive_caches
if sys.argv[1] == "capped":
    cap_primitive_caches(1)  # one entry: two shapes in turn evict each other
weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 32), 16)
for rows in (5, 6, 5, 6):
    torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 32), weight, None, "none", [], "")
"""


def _inner_product_creations(mode: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in CAPACITY_VARIABLES}
    env["ONEDNN_VERBOSE"] = "profile_create"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return [line.split("create:")[1].split(",")[0] for line in out.splitlines() if ",inner_product," in line]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_the_cap_set_after_import_torch_reaches_onednn() -> None:
    assert _inner_product_creations("default") == ["cache_miss", "cache_miss", "cache_hit", "cache_hit"]
    assert _inner_product_creations("capped") == ["cache_miss"] * 4
