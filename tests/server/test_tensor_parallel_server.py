"""Tensor parallelism through the real server: `--tensor-parallel-size 2` on CPU (gloo), two processes.

The same greedy tokens and attention rows as one rank; the same tokens alone and among 15 others
(fp32 and bf16); and a worker that dies takes the server to NOT_SERVING and a non-zero exit, never
a hang.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.client.attention import row_array
from attnserve.client.client import Client
from tests.server.server_process import ServerProcess, wait_for

pytestmark = pytest.mark.slow  # four servers, three of them with a worker process; about a minute

MODEL = "dummy:tiny"  # 4 query heads, 2 KV heads: two and one per rank
PROMPTS = [[1, 5, 9, 33, 70, 2, 5, 11], list(range(3, 60)), [7] * 3, list(range(100, 140, 3))]
OTHERS = [[(7 * i + j) % 250 + 3 for j in range(5 + 4 * i)] for i in range(15)]


def _server(tmp: Path, name: str, *args: str) -> ServerProcess:
    common = ["--model", MODEL, "--kv-cache-memory", "32MiB", "--max-num-seqs", "16"]
    return ServerProcess([*common, *args]).start(tmp / f"{name}.log").wait_serving(timeout=180)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("tp")
    started: dict[str, ServerProcess] = {}
    try:
        for name, args in {
            "tp1": ["--dtype", "float32"],
            "tp2": ["--dtype", "float32", "--tensor-parallel-size", "2"],
            "tp2-bf16": ["--dtype", "bfloat16", "--tensor-parallel-size", "2"],
        }.items():
            started[name] = _server(tmp, name, *args)
        yield started
    finally:
        for server in started.values():
            server.stop()


def _greedy(server: ServerProcess, prompt: list[int], **kwargs: object) -> tuple[list[int], list[np.ndarray]]:
    with Client(server.target, timeout=120) as client:
        reply = client.generate(token_ids=prompt, max_tokens=12, temperature=0.0, ignore_eos=True, **kwargs)
    completion = reply.completions[0]
    return list(completion.token_ids), [row_array(row) for row in completion.attention]


def test_tp2_gives_tp1_tokens_and_attention_rows(servers: dict[str, ServerProcess]) -> None:
    asked = dict(attention_layers=[0, 1], head_reduction="none", include_prompt=True, attention_dtype="float32")
    worst = 0.0
    for prompt in PROMPTS:
        tokens1, rows1 = _greedy(servers["tp1"], prompt, **asked)
        tokens2, rows2 = _greedy(servers["tp2"], prompt, **asked)
        assert tokens2 == tokens1
        assert [r.shape for r in rows2] == [r.shape for r in rows1]  # every head of every row
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(rows1, rows2, strict=True)))
    print(f"attention rows TP=2 vs TP=1 through the server: max |diff| {worst:.1e}")
    assert worst <= 1e-6


@pytest.mark.parametrize("name", ["tp2", "tp2-bf16"])
def test_tp2_tokens_alone_equal_tokens_among_15_others(servers: dict[str, ServerProcess], name: str) -> None:
    server = servers[name]
    alone = [_greedy(server, prompt)[0] for prompt in PROMPTS]
    with ThreadPoolExecutor(max_workers=16) as pool:
        for prompt, expected in zip(PROMPTS, alone, strict=True):
            others = [pool.submit(_greedy, server, other) for other in OTHERS]
            assert pool.submit(_greedy, server, prompt).result()[0] == expected
            for future in others:
                future.result()


def test_a_killed_worker_turns_the_server_not_serving_and_it_exits_non_zero(tmp_path: Path) -> None:
    server = _server(tmp_path, "doomed", "--dtype", "float32", "--tensor-parallel-size", "2")
    assert server.proc is not None
    workers = _children(server.proc.pid, "spawn_main")
    assert len(workers) == 1, workers
    statuses: list[str] = []
    watching = threading.Thread(target=_watch_health, args=(server.target, statuses), daemon=True)
    watching.start()
    wait_for(lambda: bool(statuses), timeout=10)
    assert statuses == ["SERVING"]
    os.kill(workers[0], signal.SIGKILL)
    code = server.proc.wait(timeout=30)  # never a hang
    watching.join(timeout=10)
    assert code != 0
    assert statuses == ["SERVING", "NOT_SERVING"]  # heard by a watcher before the process went
    assert f"pid {workers[0]}) exited with code -9" in server.log()
    assert "NOT_SERVING: exiting with code 1" in server.log()


def _watch_health(target: str, statuses: list[str]) -> None:
    """Record every status a gRPC health Watch stream reports until the server goes away."""
    with grpc.insecure_channel(target) as channel:
        try:
            for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError:
            pass


def _children(pid: int, marker: str) -> list[int]:
    """Pids of ``pid``'s child processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and marker in command:
            found.append(int(entry.name))
    return found
