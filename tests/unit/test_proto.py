"""The public API passes `buf lint` (STANDARD rules; the exceptions are commented in the .proto)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin; make install does)")
    proc = subprocess.run([buf, "lint"], cwd=REPO / "proto", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
