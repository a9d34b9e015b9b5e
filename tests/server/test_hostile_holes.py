"""The six holes a hostile client found, each closed and tested through the real doors (gRPC and
HTTP of one server process on loopback)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from attnserve.client import AttnserveError, Client, DeadlineExceededError, InvalidArgumentError, NotFoundError
from tests.server.server_process import ServerProcess, wait_for

pytestmark = pytest.mark.slow  # a real server process


def post(server: ServerProcess, path: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{server.http_url}{path}", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def assert_openai_error(status: int, body: Any, expected_status: int = 400) -> dict[str, Any]:
    assert status == expected_status, body
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_a_lone_surrogate_is_a_400_naming_the_field_not_a_500(tiny_server: ServerProcess) -> None:
    chat = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    error = assert_openai_error(*post(tiny_server, "/v1/chat/completions", chat))
    assert error["param"] == "messages[0].content" and "surrogate" in error["message"]
    text = b'{"prompt": "ok", "stop": ["\\udfff"], "max_tokens": 2}'
    error = assert_openai_error(*post(tiny_server, "/v1/completions", text))
    assert error["param"] == "stop[0]"
    ok = post(tiny_server, "/v1/completions", b'{"prompt": "still serving", "max_tokens": 2}')
    assert ok[0] == 200


def test_a_request_id_cannot_forge_a_log_line(client: Client, tiny_server: ServerProcess) -> None:
    forged = "x status=OK\nrequest_id=admin status=OK \x1b[2J"
    with pytest.raises(InvalidArgumentError, match="request_id"):
        client.generate("hello", request_id=forged, max_tokens=2)
    client.generate("hello", request_id="plain-id_1.2:3", max_tokens=2)
    log = tiny_server.log()
    # The refusal is logged with the id escaped: no second line, no fake field, no terminal escape.
    assert "request_id=admin status=OK" not in log and "\x1b" not in log
    assert "request_id=x\\x20status=OK\\x0arequest_id=admin" in log
    assert "request_id=plain-id_1.2:3 status=OK" in tiny_server.log()


def test_only_the_connection_that_sent_a_request_may_abort_it(client: Client, tiny_server: ServerProcess) -> None:
    stream = client.generate_stream("mine", request_id="owned", max_tokens=900, ignore_eos=True)
    next(stream)
    # Channels in one process share connections unless told not to; another client's would be its own.
    stranger = Client(tiny_server.target, timeout=30, options=[("grpc.use_local_subchannel_pool", 1)])
    with stranger, pytest.raises(NotFoundError):
        stranger.abort("owned")
    assert next(stream).token_ids  # still running
    client.abort("owned")
    with pytest.raises(AttnserveError) as ended:
        for _ in stream:
            pass
    assert ended.value.code == grpc.StatusCode.ABORTED


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": [{"role": "user", "content": "hi \xff there"}]}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested past any parser's recursion
        b"{not json",
        b'{"messages": "not a list"}',
    ],
    ids=["not-utf8", "deep", "not-json", "wrong-type"],
)
def test_every_unparseable_body_gets_the_openai_error_shape(tiny_server: ServerProcess, body: bytes) -> None:
    assert_openai_error(*post(tiny_server, "/v1/chat/completions", body))


def test_unknown_routes_get_the_openai_error_shape(tiny_server: ServerProcess) -> None:
    error = assert_openai_error(*post(tiny_server, "/v1/no-such-route", b"{}"), expected_status=404)
    assert error["code"] == "not_found"


@pytest.mark.parametrize(
    ("field", "value"),
    [("priority", 2**63), ("priority", 2**31), ("seed", -1), ("seed", 2**64), ("max_tokens", 2**32), ("n", -1)],
)
def test_http_integers_hold_what_their_grpc_twins_can(tiny_server: ServerProcess, field: str, value: int) -> None:
    body = json.dumps({"prompt": "hi", "max_tokens": 2, field: value}).encode()
    error = assert_openai_error(*post(tiny_server, "/v1/completions", body))
    assert error["param"] == field
    in_range = json.dumps({"prompt": "hi", "max_tokens": 2, "seed": 2**64 - 1, "priority": -(2**31)}).encode()
    assert post(tiny_server, "/v1/completions", in_range)[0] == 200


def test_a_grpc_deadline_is_logged_and_counted_as_a_deadline_with_its_tokens(
    client: Client, tiny_server: ServerProcess
) -> None:
    before = tiny_server.metric("attnserve_request_failure_total", 'reason="deadline"', default=0.0)
    with pytest.raises(DeadlineExceededError):
        client.generate("slow", request_id="late-one", max_tokens=900, ignore_eos=True, timeout=0.5)
    wait_for(lambda: "request_id=late-one " in tiny_server.log(), timeout=30)
    line = next(line for line in tiny_server.log().splitlines() if "request_id=late-one " in line)
    assert "status=DEADLINE_EXCEEDED" in line, line
    assert re.search(r"prompt_tokens=\d+ ", line), line
    wait_for(
        lambda: tiny_server.metric("attnserve_request_failure_total", 'reason="deadline"', default=0.0) > before,
        timeout=5,
    )


def test_a_cancelled_stream_logs_the_tokens_it_got(client: Client, tiny_server: ServerProcess) -> None:
    stream = client.generate_stream("then I leave", request_id="leaver", max_tokens=900, ignore_eos=True)
    for _ in range(3):
        next(stream)
    stream.close()
    # The cancel reaches the server at once; on a loaded CI machine its log line has taken over 5 s.
    wait_for(lambda: "request_id=leaver " in tiny_server.log(), timeout=30)
    line = next(line for line in tiny_server.log().splitlines() if "request_id=leaver " in line)
    assert "status=CANCELLED" in line
    completion = int(re.search(r"completion_tokens=(\d+)", line).group(1))  # type: ignore[union-attr]
    assert completion >= 3, line
