"""A real `python -m server` process on loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 1.0) -> float:
    """Seconds until predicate() held; fails past timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout}s")


def health_status(target: str, timeout: float = 2.0) -> str | None:
    """'SERVING' / 'NOT_SERVING', or None if the server does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass
class ServerProcess:
    args: list[str]
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, log_path: Path) -> ServerProcess:
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            *self.args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_serving(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if health_status(self.target, timeout=0.5) == "SERVING":
                return self
            time.sleep(0.1)
        raise TimeoutError(f"server not SERVING after {timeout}s:\n{self.log()}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def metric(self, name: str, labels: str = "", *, default: float | None = None) -> float:
        """Value of one sample, e.g. metric('attnserve_request_success_total', 'finished_reason="stop"').

        A series that is not exported raises (a renamed metric must not read as 0), unless the
        caller gives a ``default`` for a labelled counter that has not been incremented yet.
        """
        want = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics_text().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == want:
                return float(value)
        if default is not None and f"# TYPE {name} " in self.metrics_text():
            return default
        raise KeyError(f"{want} is not exported")

    def is_idle(self) -> bool:
        """Nothing running and every KV block back (per /metrics)."""
        return self.metric("attnserve_num_requests_running") == 0 and self.metric("attnserve_kv_cache_usage_perc") == 0

    def rss_mb(self) -> float:
        """The server process's resident memory, MB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""
