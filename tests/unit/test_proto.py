"""The public API passes `buf lint` (STANDARD rules; the exceptions are commented in the .proto) and
`buf breaking` against the published API (the commit in proto/BREAKING_BASELINE, FILE rules)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin; make install does)")
    proc = subprocess.run([buf, "lint"], cwd=REPO / "proto", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buf_breaking_against_the_published_api(tmp_path: Path) -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin; make install does)")
    lines = (REPO / "proto" / "BREAKING_BASELINE").read_text().splitlines()
    baseline = next(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    archive = subprocess.run(["git", "archive", baseline, "proto"], cwd=REPO, capture_output=True, timeout=60)
    if archive.returncode != 0:  # a shallow clone: the baseline's proto is not here
        pytest.skip(f"commit {baseline[:12]} is not in this clone: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tmp_path, filter="data")
    proc = subprocess.run(
        [buf, "breaking", "--against", str(tmp_path / "proto")],
        cwd=REPO / "proto",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
