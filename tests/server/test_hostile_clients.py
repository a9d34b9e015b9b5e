"""Hostile or careless clients cannot stall or exhaust the server (issue: hostile input).

Each case: refused before work with the right status and an actionable message, other
clients unaffected, nothing leaked. RSS is measured by bench/hostile_rss.py, not here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from attnserve.client import (
    Client,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tests.server.server_process import ServerProcess, health_status, wait_for

pytestmark = pytest.mark.slow  # real server processes
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model with small back-pressure and attention limits, so the tests can reach them."""
    args = ["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "64MiB"]
    args += ["--max-stream-backlog-tokens", "32", "--max-stream-backlog-bytes", "256KiB"]
    args += ["--stalled-reader-timeout", "3", "--max-response-bytes", "4MiB"]
    args += ["--max-attention-bytes-per-request", "16MiB", "--attention-memory-budget", "8MiB"]
    args += ["--max-attention-scores-per-step", "200000"]
    server = ServerProcess(args).start(tmp_path_factory.mktemp("guarded") / "server.log")
    try:
        yield server.wait_serving()
    finally:
        server.stop()


class Streamer(threading.Thread):
    """A well-behaved client streaming tokens in the background; records the gaps between messages."""

    def __init__(self, target: str, max_tokens: int = 600) -> None:
        super().__init__(daemon=True)
        self.target, self.max_tokens = target, max_tokens
        self.arrivals: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.target, timeout=120) as c:
                for _ in c.generate_stream("steady", max_tokens=self.max_tokens, ignore_eos=True, **GREEDY):
                    self.arrivals.append(time.monotonic())
        except BaseException as exc:  # reported by the test
            self.error = exc

    @property
    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)), default=0.0)


def test_a_reader_that_never_reads_is_paused_then_ended(guarded: ServerProcess) -> None:
    # Without BDP probing the client's HTTP/2 window stays at 64 KiB: the transport cannot soak
    # up the whole output (it grew past it on a loaded machine), so what piles up is the server's.
    with Client(guarded.target, timeout=120, options=[("grpc.http2.bdp_probe", 0)]) as c:
        stream = c.generate_stream(
            token_ids=[5] * 10, max_tokens=900, ignore_eos=True, attention_layers=[0, 1], head_reduction="none"
        )
        next(stream)  # the call is open; from here on this client reads nothing
        wait_for(lambda: guarded.metric("attnserve_num_requests_paused") == 1, timeout=20)
        backlog = guarded.metric("attnserve_stream_backlog_bytes")
        assert backlog <= (256 << 10) + (64 << 10), backlog  # the bound, plus at most one step's output
        # Others keep their pace meanwhile.
        other = c.generate("meanwhile", max_tokens=20, ignore_eos=True, **GREEDY)
        assert other.usage.completion_tokens == 20
        # Still unread after --stalled-reader-timeout: the server ends it and frees its blocks.
        wait_for(lambda: guarded.is_idle(), timeout=20)
        assert guarded.metric("attnserve_stream_backlog_bytes") == 0
        assert guarded.metric("attnserve_request_failure_total", 'reason="stalled"', default=0.0) >= 1
        with pytest.raises(ResourceExhaustedError, match="not read"):
            for _ in stream:  # what was buffered, then the status
                pass


def test_a_4mb_prompt_is_refused_while_others_stream_and_health_answers(guarded: ServerProcess) -> None:
    streamer = Streamer(guarded.target)
    streamer.start()
    wait_for(lambda: len(streamer.arrivals) > 5, timeout=20)
    huge = "All work and no play. " * 180_000  # ~4 MB, just under the 4 MiB message limit

    def send() -> str:
        with Client(guarded.target, timeout=60) as c, pytest.raises(InvalidArgumentError) as caught:
            c.generate(huge, max_tokens=4)
        return caught.value.message

    with ThreadPoolExecutor(3) as pool:
        refusals = [pool.submit(send) for _ in range(3)]
        health_latencies = []
        while not all(f.done() for f in refusals):
            start = time.monotonic()
            assert health_status(guarded.target, timeout=1.0) == "SERVING"
            health_latencies.append(time.monotonic() - start)
    assert all("cannot fit" in f.result() for f in refusals)
    streamer.join(60)
    assert streamer.error is None and len(streamer.arrivals) > 100
    assert max(health_latencies) < 1.0 and streamer.longest_gap < 1.0, (health_latencies, streamer.longest_gap)


def test_prompt_rows_of_a_long_prompt_do_not_starve_other_streams(guarded: ServerProcess) -> None:
    streamer = Streamer(guarded.target, max_tokens=400)
    streamer.start()
    wait_for(lambda: len(streamer.arrivals) > 5, timeout=20)
    with Client(guarded.target, timeout=120) as c:
        reply = c.generate(
            token_ids=[3 + i % 380 for i in range(1000)],
            max_tokens=2,
            ignore_eos=True,
            attention_layers=[0, 1],
            include_prompt=True,
        )
    rows = reply.completions[0].attention
    assert len(rows) == 2 * 1001 and len({(r.layer, r.position) for r in rows}) == len(rows)
    streamer.join(60)
    assert streamer.error is None and streamer.longest_gap < 1.0, streamer.longest_gap


def test_a_whole_response_too_big_for_one_message_is_refused_up_front(guarded: ServerProcess) -> None:
    # ~6 MB of float16 weights: under the 16 MiB per-request cap, over the 4 MiB message limit.
    ask = dict(token_ids=[7] * 200, max_tokens=700, ignore_eos=True, attention_layers=[0, 1], head_reduction="none")
    with Client(guarded.target, timeout=60) as c:
        with pytest.raises(InvalidArgumentError, match="GenerateStream"):
            c.generate(**ask)
        sizes = [m.ByteSize() for m in c.generate_stream(**ask)]
    assert max(sizes) <= 4 << 20 and sum(sizes) > 4 << 20


def test_concurrent_attention_requests_share_one_memory_budget(guarded: ServerProcess) -> None:
    # Each whole response holds ~3.4 MB of float16 weights until it is sent; the budget is 8 MiB: two fit.
    ask = dict(token_ids=[9] * 10, max_tokens=640, ignore_eos=True, attention_layers=[0, 1], head_reduction="none")
    with Client(guarded.target, timeout=120) as c, ThreadPoolExecutor(2) as pool:
        running = [pool.submit(c.generate, **ask) for _ in range(2)]
        wait_for(lambda: guarded.metric("attnserve_attention_memory_reserved_bytes") > 6e6, timeout=10)
        with pytest.raises(ResourceExhaustedError, match="attention"):
            c.generate(**ask)
        assert all(len(f.result().completions[0].attention) == 2 * 640 for f in running)
        wait_for(lambda: guarded.metric("attnserve_attention_memory_reserved_bytes") == 0, timeout=10)
        assert c.generate(**ask).usage.completion_tokens == 640  # room again


def test_a_tiny_temperature_is_greedy_not_token_zero(guarded: ServerProcess) -> None:
    with Client(guarded.target, timeout=60) as c:
        greedy = c.generate("tiny temperature", max_tokens=12, ignore_eos=True, temperature=0.0)
        tiny = c.generate("tiny temperature", max_tokens=12, ignore_eos=True, temperature=1e-38)
    assert list(tiny.completions[0].token_ids) == list(greedy.completions[0].token_ids)
    assert set(tiny.completions[0].token_ids) != {0}


def test_bytes_that_are_not_a_request_get_invalid_argument_and_no_traceback(guarded: ServerProcess) -> None:
    not_utf8 = b"\x04ab\xff\xfe"  # a length-delimited field of 4 bytes that are not UTF-8
    with grpc.insecure_channel(guarded.target) as channel:
        for method, field_tag in (("Generate", b"\x12"), ("GenerateStream", b"\x12"), ("Tokenize", b"\x0a")):
            call = (channel.unary_stream if method == "GenerateStream" else channel.unary_unary)(
                f"/attnserve.v1.GeneratorService/{method}"
            )
            with pytest.raises(grpc.RpcError) as caught:  # the prompt (Generate) or text (Tokenize) field
                reply = call(field_tag + not_utf8, timeout=10)
                list(reply) if method == "GenerateStream" else reply
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid protobuf message" in caught.value.details()
    assert "Traceback" not in guarded.log()


def test_streams_cut_by_shutdown_end_with_unavailable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = ["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--shutdown-timeout", "0.5"]
    server = ServerProcess(args).start(tmp_path / "server.log")
    server.wait_serving()
    outcomes: list[str] = []

    def stream() -> None:
        with Client(server.target, timeout=60) as c:
            try:
                for _ in c.generate_stream("long", max_tokens=1000, ignore_eos=True, **GREEDY):
                    pass
                outcomes.append("OK")
            except UnavailableError as exc:
                outcomes.append("UNAVAILABLE" if "shut down" in exc.message else f"other: {exc}")

    threads = [threading.Thread(target=stream) for _ in range(16)]
    for t in threads:
        t.start()
    wait_for(lambda: server.metric("attnserve_num_requests_running") == 16, timeout=20)
    assert server.terminate() == 0
    for t in threads:
        t.join(30)
    assert outcomes == ["UNAVAILABLE"] * 16, outcomes
