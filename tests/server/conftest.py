from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from attnserve.client import Client
from tests.server.server_process import ServerProcess


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny random model behind a real server process (float32, small cache)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = ServerProcess(
        [
            "--model",
            "dummy:tiny",
            "--dtype",
            "float32",
            "--kv-cache-memory",
            "64MiB",
            "--max-num-waiting",
            "64",
            "--shutdown-timeout",
            "10",
            "--max-attention-bytes-per-request",
            "4MiB",
        ]
    ).start(log)
    try:
        yield server.wait_serving()
    finally:
        server.stop()


@pytest.fixture
def client(tiny_server: ServerProcess) -> Iterator[Client]:
    with Client(tiny_server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def tmp_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text("s3cret-token\n")
    return path
