"""Tensor parallelism through the real server: `--tensor-parallel-size 2` on CPU (gloo), two processes.

The same greedy tokens and attention rows as one rank; the same tokens alone and among 15 others
(fp32 and bf16); and a worker that dies takes the server to NOT_SERVING and a non-zero exit, never
a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.client.attention import row_array
from attnserve.client.client import AttnserveError, Client
from attnserve.client.inspection import Ablate, Steer, residual_values
from tests.server.server_process import REPO, ServerProcess, free_port, wait_for

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
    with Client(servers["tp2"].target) as client:
        assert client.server_info().tensor_parallel_size == 2
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


def test_tp2_reads_and_steers_as_tp1(servers: dict[str, ServerProcess]) -> None:
    """Residual reads, the logit lens (gathered vocabulary), steering and head ablation (heads 1 and 2
    live on different ranks) give what one rank gives."""
    vector = [((i * 37) % 11 - 5) / 20 for i in range(64)]  # tiny's hidden size
    asked = dict(
        residual_points=["resid_post", "attn_out"],
        residual_layers=[0, 1],
        logit_lens_layers=[0, 1],
        logit_lens_top_k=5,
        inspect_prompt=True,
        steering=[Steer(layer=1, vector=vector, scale=4.0)],
        ablations=[Ablate(layer=0, heads=[1, 2])],
    )
    replies = {}
    for name in ("tp1", "tp2"):
        with Client(servers[name].target, timeout=120) as client:
            reply = client.generate(token_ids=PROMPTS[1], max_tokens=8, temperature=0.0, ignore_eos=True, **asked)
        replies[name] = reply.completions[0]
    one, two = replies["tp1"], replies["tp2"]
    assert list(two.token_ids) == list(one.token_ids)
    plain = _greedy(servers["tp2"], PROMPTS[1])[0][:8]
    assert list(two.token_ids) != plain  # the steering and ablation changed something
    assert [(r.point, r.layer, r.position) for r in two.residuals] == [
        (r.point, r.layer, r.position) for r in one.residuals
    ]
    worst = max(
        float(np.abs(np.array(residual_values(a)) - np.array(residual_values(b))).max())
        for a, b in zip(one.residuals, two.residuals, strict=True)
    )
    print(f"residuals TP=2 vs TP=1 with steering and ablation: max |diff| {worst:.1e}")
    assert worst <= 1e-5
    assert [list(r.token_ids) for r in two.logit_lens] == [list(r.token_ids) for r in one.logit_lens]
    assert np.allclose([list(r.probs) for r in two.logit_lens], [list(r.probs) for r in one.logit_lens], atol=1e-6)


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


def test_a_size_that_does_not_split_the_model_is_refused_in_one_line(tmp_path: Path) -> None:
    server = ServerProcess(["--model", MODEL, "--tensor-parallel-size", "3"]).start(tmp_path / "three.log")
    assert server.proc is not None
    assert server.proc.wait(timeout=120) == 2
    log = server.log()
    assert "error: tensor parallel size 3 does not divide its 4 query heads" in log
    assert "Traceback" not in log and "CRITICAL" not in log  # the workers ended quietly, no failure reported


def test_sigterm_stops_every_rank_and_exits_zero(tmp_path: Path) -> None:
    server = _server(tmp_path, "drained", "--dtype", "float32", "--tensor-parallel-size", "2")
    assert server.proc is not None
    workers = _children(server.proc.pid, "spawn_main")
    assert server.terminate() == 0
    for pid in workers:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _is_zombie(pid), timeout=10)


def test_two_nodes_serve_as_one_and_a_lost_node_ends_the_leader(tmp_path: Path) -> None:
    """--nnodes 2 on one machine: node 1 runs its rank only (no doors); the leader gives TP=1's tokens.
    Node 1 lost: the leader's next step fails on the closed connection, NOT_SERVING, exit 1."""
    port = free_port()
    node = ["--model", MODEL, "--dtype", "float32", "--kv-cache-memory", "32MiB", "--tensor-parallel-size", "2"]
    node += ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    with open(tmp_path / "node1.log", "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "server", *node, "--node-rank", "1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        leader = _server(tmp_path, "node0", *node[2:], "--node-rank", "0")
        assert leader.proc is not None
        reference = _greedy_tokens_of_tp1(tmp_path)
        assert [_greedy(leader, prompt)[0] for prompt in PROMPTS[:2]] == reference
        worker.kill()
        worker.wait(timeout=10)
        with pytest.raises(AttnserveError):
            _greedy(leader, PROMPTS[2])
        assert leader.proc.wait(timeout=30) == 1
        assert "NOT_SERVING: exiting with code 1" in leader.log()
    finally:
        if worker.poll() is None:
            worker.kill()


def _greedy_tokens_of_tp1(tmp_path: Path) -> list[list[int]]:
    one = _server(tmp_path, "one", "--dtype", "float32")
    try:
        return [_greedy(one, prompt)[0] for prompt in PROMPTS[:2]]
    finally:
        one.stop()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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
