"""A short seeded fuzz of both doors (bench/fuzz_doors.py; `make fuzz` runs 10,000 requests):
generated gRPC messages from the proto descriptors, raw bytes and mutated OpenAI bodies, against
a real server. No INTERNAL / UNKNOWN / 5xx, no hang, health SERVING throughout, and no request
or KV block left behind."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from tests.server.server_process import ServerProcess

pytestmark = pytest.mark.slow  # a real server process
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fuzz_doors  # noqa: E402


def test_1000_fuzzed_requests_leave_the_server_whole(
    tiny_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny_server.proc is not None
    args = argparse.Namespace(
        grpc=tiny_server.target,
        http=tiny_server.http_url,
        metrics=f"http://127.0.0.1:{tiny_server.metrics_port}",
        pid=tiny_server.proc.pid,
        requests=1000,
        concurrency=8,
        seed=7,
        hang_s=60.0,
    )
    failed = fuzz_doors.run(args)
    report = capsys.readouterr().out
    assert failed == 0, report
    assert "grpc OK" in report and "http 200" in report  # the fuzz reached generation, not only refusals
