"""Fuzz both doors of a running server: generated gRPC messages (built from the proto descriptors),
raw bytes, and mutated OpenAI JSON bodies, concurrently; then check the server is whole.

    python bench/fuzz_doors.py --requests 10000 --seed 1      # starts a server on the tiny model (make fuzz)
    python bench/fuzz_doors.py --grpc HOST:PORT --http http://HOST:PORT --metrics http://HOST:PORT --pid PID

A failure is: a gRPC INTERNAL or UNKNOWN, an HTTP 5xx (other than 503 while draining), a request
that does not answer within --hang-s, health not SERVING between rounds, or KV blocks / running
requests not back to zero once the load stops. Prints the counts by status and exits non-zero on
any failure. tests/server/test_fuzz_doors.py runs a short seeded round; `make fuzz` the long one.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.v1 import generate_pb2 as pb

METHOD = "/attnserve.v1.GeneratorService/Generate"
_TEXT = ["", "hi", "What is 2+2?", "é🙂\u200b", "\x00\x01", "a" * 5000, "<|im_start|>system", "\ud7ff"]
_INTS = [0, 1, 2, 3, 7, 64, -1, -(2**31), 2**31 - 1, 2**32 - 1, 2**63 - 1, -(2**63)]
_FLOATS = [0.0, 1.0, 0.5, -1.0, 1e-9, 2.0, 1e30, float("nan"), float("inf"), -float("inf")]


def _value(field: FieldDescriptor, rng: random.Random, depth: int) -> Any:
    t = field.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        return _message(field.message_type._concrete_class, rng, depth + 1)
    if t == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    if t == FieldDescriptor.TYPE_STRING:
        return rng.choice(_TEXT)
    if t == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 3, 100]))
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice(_FLOATS)
    unsigned = t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32)
    bits = 32 if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_SINT32) else 64
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return min(max(rng.choice([*_INTS, rng.randrange(0, 400)]), low), high)


def _message(cls: Any, rng: random.Random, depth: int = 0) -> Any:
    """A message with a random subset of its fields set to edge-case values of their types."""
    message = cls()
    if depth > 3:
        return message
    for field in cls.DESCRIPTOR.fields:
        if rng.random() > 0.35:
            continue
        try:
            if field.is_repeated:
                values = [_value(field, rng, depth) for _ in range(rng.choice([0, 1, 2, 40]))]
                getattr(message, field.name).extend(values)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(_value(field, rng, depth))
            else:
                setattr(message, field.name, _value(field, rng, depth))
        except (ValueError, TypeError):
            pass  # a value the Python protobuf itself refuses (e.g. a surrogate in a string)
    return message


def grpc_case(rng: random.Random) -> tuple[str, bytes]:
    if rng.random() < 0.1:  # bytes that may not parse at all
        return "grpc-bytes", rng.randbytes(rng.choice([1, 7, 64, 600]))
    request = _message(pb.GenerateRequest, rng)
    if rng.random() < 0.7:  # most with an input, so they get past the first check
        request.prompt = rng.choice(_TEXT[1:4])
    if rng.random() < 0.8:  # keep generations short: the fuzz is about inputs, not long outputs
        request.stopping.max_tokens = rng.choice([1, 2, 4])
    return "grpc", request.SerializeToString()


_BASE_CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
_BASE_TEXT: dict[str, Any] = {"prompt": "hi", "max_tokens": 2}
_JUNK = [None, True, -1, 0, 2**64, 1.5, float("nan"), "", "x" * 300, [], {}, [1, "a"], {"a": {"b": [None]}}]
_KEYS = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "stream",
    "logprobs",
    "top_logprobs",
    "echo",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "prompt_logprobs",
    "priority",
    "attention",
    "response_format",
    "tools",
    "tool_choice",
    "messages",
    "prompt",
    "stream_options",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "max_completion_tokens",
    "return_token_ids",
]


def http_case(rng: random.Random) -> tuple[str, str, bytes]:
    chat = rng.random() < 0.5
    body = dict(_BASE_CHAT if chat else _BASE_TEXT)
    for _ in range(rng.choice([0, 1, 2, 4])):
        body[rng.choice(_KEYS)] = rng.choice([*_JUNK, rng.randrange(-5, 50)])
    if chat and rng.random() < 0.2:
        body["messages"] = [
            {"role": rng.choice(["user", "system", "tool", "x"]), "content": rng.choice(_JUNK + _TEXT[:4])}
        ]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    raw = json.dumps(body, allow_nan=True).encode()
    roll = rng.random()
    if roll < 0.05:
        raw = raw[: rng.randrange(len(raw))]  # cut short
    elif roll < 0.08:
        raw = rng.randbytes(50)
    elif roll < 0.1:
        raw = b"[" * 50_000 + b"]" * 50_000
    return "http", path, raw


def send_grpc(channel: grpc.Channel, payload: bytes, hang_s: float) -> str:
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=hang_s)
        return "OK"
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[attr-defined]


def send_http(base: str, path: str, raw: bytes, hang_s: float) -> str:
    request = urllib.request.Request(base + path, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=hang_s) as reply:
            reply.read()
            return str(reply.status)
    except urllib.error.HTTPError as error:
        body = error.read()
        if error.code < 500 and b'"error"' not in body:
            return f"{error.code}-not-openai-shape"
        return str(error.code)
    except TimeoutError:
        return "HANG"
    except urllib.error.URLError as error:
        return "HANG" if isinstance(error.reason, TimeoutError) else f"conn:{error.reason}"


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise KeyError(name)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    rss_before = rss_mb(args.pid)
    cases = [grpc_case(rng) if rng.random() < 0.5 else http_case(rng) for _ in range(args.requests)]
    channel = grpc.insecure_channel(args.grpc, options=[("grpc.max_send_message_length", 64 << 20)])
    health = health_pb2_grpc.HealthStub(channel)
    statuses: Counter[str] = Counter()
    failures: list[str] = []

    def one(case: tuple) -> tuple[str, str]:
        if case[0] in ("grpc", "grpc-bytes"):
            return case[0], send_grpc(channel, case[1], args.hang_s)
        return "http", send_http(args.http, case[1], case[2], args.hang_s)

    start = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for i in range(0, len(cases), 500):
            for door, status in pool.map(one, cases[i : i + 500]):
                statuses[f"{door} {status}"] += 1
                bad = (
                    status in ("INTERNAL", "UNKNOWN", "HANG")
                    or status.startswith(("5", "conn"))
                    or "not-openai" in status
                )
                if bad and status != "503":
                    failures.append(f"{door} {status}")
            serving = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if serving != health_pb2.HealthCheckResponse.SERVING:
                failures.append(f"health {serving} after {i + 500} requests")
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + 60  # the load has stopped: everything must drain back to zero
    while time.monotonic() < deadline and (
        metric(args.metrics, "attnserve_num_requests_running") or metric(args.metrics, "attnserve_kv_cache_usage_perc")
    ):
        time.sleep(0.5)
    running, kv = (
        metric(args.metrics, "attnserve_num_requests_running"),
        metric(args.metrics, "attnserve_kv_cache_usage_perc"),
    )
    if running or kv:
        failures.append(f"not back to baseline: {running} running, KV usage {kv}")
    print(f"{sum(statuses.values())} requests in {elapsed:.0f} s, seed {args.seed}:")
    for status, count in sorted(statuses.items()):
        print(f"  {status}: {count}")
    rss_after = rss_mb(args.pid)
    if rss_before is not None and rss_after is not None:
        print(f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after")
    print(f"after: {running:.0f} running, KV usage {kv:.3f}; failures: {len(failures)}")
    for failure in Counter(failures).most_common(10):
        print(f"  FAIL {failure[0]} x{failure[1]}")
    return 1 if failures else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_own_server(args: argparse.Namespace) -> int:
    """Start a server on --model, fuzz it, stop it."""
    ports = {name: free_port() for name in ("port", "metrics-port", "http-port")}
    cmd = [sys.executable, "-m", "attnserve.server", "--model", args.model, "--dtype", "float32"]
    cmd += ["--kv-cache-memory", "64MiB", *(f"--{k}={v}" for k, v in ports.items())]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            args.grpc, args.pid = f"127.0.0.1:{ports['port']}", proc.pid
            args.http, args.metrics = (
                f"http://127.0.0.1:{ports['http-port']}",
                f"http://127.0.0.1:{ports['metrics-port']}",
            )
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(args.grpc))
            deadline = time.monotonic() + 300
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"the server did not start:\n{log.read().decode(errors='replace')[-3000:]}")
                time.sleep(0.5)
            return run(args)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", help="a running server's gRPC address (default: start one)")
    parser.add_argument("--http")
    parser.add_argument("--metrics")
    parser.add_argument("--pid", type=int, help="the running server's pid, for its RSS")
    parser.add_argument("--model", default="dummy:tiny", help="the model of the server started here")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hang-s", type=float, default=30.0, help="a request not answered by then is a hang")
    args = parser.parse_args()
    sys.exit(run(args) if args.grpc else with_own_server(args))


if __name__ == "__main__":
    main()
