"""The real server on the default model: health through its life, a correct answer, a clean drain."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from attnserve.client import Client
from attnserve.v1 import generate_pb2 as pb
from tests.server.server_process import ServerProcess, health_status


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_health_answer_and_drain_on_the_default_model(tmp_path: Path, default_gguf: Path) -> None:
    server = ServerProcess(
        ["--model", str(default_gguf), "--dtype", "float32", "--kv-cache-memory", "256MiB", "--shutdown-timeout", "60"]
    )
    server.start(tmp_path / "server.log")
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # NOT_SERVING while the model loads and warms up, then SERVING
        status = health_status(server.target, timeout=0.5)
        if status and (not seen or seen[-1] != status):
            seen.append(status)
        if status == "SERVING":
            break
        assert server.proc is not None and server.proc.poll() is None, server.log()
        time.sleep(0.05)
    assert seen == ["NOT_SERVING", "SERVING"], seen

    with Client(server.target, timeout=120) as client:
        # No sampling fields: the server's default (greedy) answers a first call sensibly.
        answer = client.generate("What is the capital of France?", chat=True, max_tokens=24).completions[0]
        assert "Paris" in answer.text and answer.finish_reason == pb.FINISH_REASON_STOP

    finished: list[tuple[int, int]] = []
    in_flight = [threading.Event() for _ in range(2)]  # SIGTERM only once both streams have a token

    def stream(started: threading.Event) -> None:
        with Client(server.target, timeout=120) as c:
            tokens, final = 0, None
            for chunk in c.generate_stream(
                "Tell me a long story about a dragon.", chat=True, max_tokens=40, ignore_eos=True, temperature=0
            ):
                tokens += len(chunk.token_ids)
                started.set()
                final = chunk.finish_reason or final
            finished.append((tokens, final))

    threads = [threading.Thread(target=stream, args=(event,)) for event in in_flight]
    for t in threads:
        t.start()
    assert all(event.wait(60) for event in in_flight)
    assert server.proc is not None
    server.proc.send_signal(15)  # SIGTERM with two streams in flight
    draining = None
    for _ in range(50):
        draining = health_status(server.target, timeout=0.5)
        if draining != "SERVING":
            break
        time.sleep(0.05)
    assert draining == "NOT_SERVING"
    for t in threads:
        t.join(120)
    assert finished == [(40, pb.FINISH_REASON_LENGTH)] * 2
    assert server.proc.wait(60) == 0, server.log()
