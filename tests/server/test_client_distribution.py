"""The client as its own distribution: installed alone into a fresh venv it brings no torch,
and its CLI talks to a running server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # builds a wheel and a venv, installs from the package index


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("client-dist")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(work), "./client"],
        cwd=REPO,
    )
    wheels = list(work.glob("attnserve_client-*.whl"))
    assert len(wheels) == 1, wheels
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin/pip"), "install", "--quiet", "--disable-pip-version-check", str(wheels[0])])
    return venv


def test_the_client_alone_brings_no_torch(client_venv: Path) -> None:
    listed = run([str(client_venv / "bin/pip"), "list", "--format=freeze"]).stdout.lower()
    assert "attnserve-client==" in listed
    assert "torch" not in listed and "attnserve==" not in listed
    probe = "import importlib.util as u, attnserve.client; print(u.find_spec('torch') is None)"
    assert run([str(client_venv / "bin/python"), "-c", probe], cwd="/").stdout.strip() == "True"


def test_the_installed_cli_talks_to_a_running_server(client_venv: Path, tiny_server: ServerProcess) -> None:
    cli = str(client_venv / "bin/attnserve")
    info = run([cli, "info", "--target", tiny_server.target], cwd="/").stdout
    assert "health: SERVING" in info and "name: tiny" in info
    out = run(
        [cli, "generate", "hello", "--target", tiny_server.target, "--max-tokens", "5", "--ignore-eos", "-v"], cwd="/"
    )
    assert "[5 tokens" in out.stderr
