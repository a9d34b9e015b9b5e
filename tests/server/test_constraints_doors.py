"""Constraints through both doors: a real server process on loopback (the tiny random model), the
real gRPC client and the real openai SDK. Unconstrained, that model's text never parses: every
parsing answer here is the constraint's doing."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from attnserve.client import AttnserveError, Client
from attnserve.client.__main__ import main as cli_main
from attnserve.v1 import generate_pb2 as pb
from tests.server.server_process import ServerProcess

pytestmark = pytest.mark.slow  # a real server process

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "capital": {"type": "boolean"},
        "rank": {"enum": [1, 2, 3]},
    },
    "required": ["city", "population", "capital", "rank"],
    "additionalProperties": False,
}
PROMPTS = ["Describe Paris as JSON.", "Give me a city.", "x", "What is the capital of France?", "0 1 2 3 4 5 6 7"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-num-waiting", "64"]
    proc = ServerProcess(args).start(tmp_path_factory.mktemp("constraints") / "server.log")
    try:
        yield proc.wait_serving()
    finally:
        proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, timeout=60) as c:
        yield c


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)


# ------------------------------------------------------------------- gRPC
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_grpc_json_schema_regex_and_choice_always_match(client: Client, seeded: bool) -> None:
    sampling: dict[str, Any] = {"temperature": 1.0, "seed": 7} if seeded else {"temperature": 0.0}
    for prompt in PROMPTS:
        reply = client.generate(prompt, json_schema=SCHEMA, max_tokens=120, **sampling)
        (c,) = reply.completions
        assert c.finish_reason == pb.FINISH_REASON_STOP, c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
        reply = client.generate(prompt, regex=r"[A-Z][a-z]{1,8} [0-9]{3}", max_tokens=40, **sampling)
        assert re.fullmatch(r"[A-Z][a-z]{1,8} [0-9]{3}", reply.completions[0].text)
        reply = client.generate(prompt, choice=["red", "green", "blue"], max_tokens=40, n=3, **sampling)
        assert all(c.text in ("red", "green", "blue") for c in reply.completions)
    reply = client.generate("{", json_object=True, max_tokens=200, **sampling)
    text = reply.completions[0].text
    if reply.completions[0].finish_reason == pb.FINISH_REASON_STOP:
        assert isinstance(json.loads(text), dict)
    else:  # an object may run long on a random model: it is still a prefix of one
        assert text.startswith("{")


def test_grpc_stream_with_a_grammar(client: Client) -> None:
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'
    chunks = list(client.generate_stream("Numbers:", grammar=grammar, max_tokens=60))
    text = "".join(c.text for c in chunks)
    assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", text), text
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


# ------------------------------------------------------------------- HTTP
def test_openai_response_format_json_schema_strict(server: ServerProcess) -> None:
    client = sdk(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    for prompt in PROMPTS:
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompt}],
            response_format=fmt,  # type: ignore[arg-type]
            max_tokens=120,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        response_format=fmt,  # type: ignore[arg-type]
        max_tokens=120,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_openai_async_guided_fields(server: ServerProcess) -> None:
    asyncio.run(_async_guided_fields(server))


async def _async_guided_fields(server: ServerProcess) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = await client.completions.create(
        model="tiny", prompt="Pick:", max_tokens=20, extra_body={"guided_choice": ["alpha", "beta"]}
    )
    assert reply.choices[0].text in ("alpha", "beta")
    reply = await client.completions.create(
        model="tiny", prompt="Code:", max_tokens=20, extra_body={"guided_regex": "[0-9]{4}-[a-z]{2}"}
    )
    assert re.fullmatch("[0-9]{4}-[a-z]{2}", reply.choices[0].text)
    chat = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=120,
        extra_body={"guided_json": SCHEMA, "seed": 3, "temperature": 1.0},
    )
    jsonschema.validate(json.loads(chat.choices[0].message.content or ""), SCHEMA)
    await client.close()


# ------------------------------------------------------------ hostile input
def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "deep nesting": ({"json_schema": deep_schema(200)}, "nested more than"),
    "huge enum": ({"json_schema": {"enum": [f"value-{i}" for i in range(100_000)]}}, "the limit is"),
    "invalid schema": ({"json_schema": {"type": "nonsense"}}, "nonsense"),
    "not JSON": ({"json_schema": "{oops"}, "not valid JSON"),
    "bad regex": ({"regex": "(abc"}, "unclosed group"),
    "look-around regex": ({"regex": "(?=a)b"}, "look-around"),
    "bad grammar": ({"grammar": "start: foo"}, "unknown name"),
    "empty choice": ({"choice": ["a", ""]}, "a choice is empty"),
}


def test_grpc_hostile_constraints_refused_quickly_while_others_are_served(
    client: Client, server: ServerProcess
) -> None:
    served: list[float] = []

    def others() -> None:
        with Client(server.target, timeout=60) as other:
            for _ in range(4):
                t0 = time.monotonic()
                other.generate("steady", max_tokens=8)
                served.append(time.monotonic() - t0)

    thread = threading.Thread(target=others)
    thread.start()
    for name, (kwargs, expected) in HOSTILE.items():
        t0 = time.monotonic()
        with pytest.raises(AttnserveError) as info:
            client.generate("x", max_tokens=10, **kwargs)
        elapsed = time.monotonic() - t0
        assert info.value.code.name == "INVALID_ARGUMENT", name
        assert "constraint." in str(info.value) and expected in str(info.value), (name, str(info.value))
        assert elapsed < 5, (name, elapsed)
    thread.join(60)
    assert len(served) == 4 and max(served) < 30


def test_grpc_empty_constraint_is_refused(client: Client) -> None:
    request = pb.GenerateRequest(prompt="x")
    request.constraint.SetInParent()
    with pytest.raises(AttnserveError, match="set one kind of constraint"):
        client.send(request)


def test_http_hostile_constraints_are_400_naming_the_field(server: ServerProcess) -> None:
    client = sdk(server)
    cases = {
        "response_format": {"response_format": {"type": "json_schema", "json_schema": {"schema": deep_schema(100)}}},
        "guided_regex": {"guided_regex": "(abc"},
        "guided_json": {"guided_json": {"type": "nonsense"}},
        "guided_grammar": {"guided_grammar": "start: foo"},
    }
    for name, extra in cases.items():
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5, extra_body=extra
            )
        assert time.monotonic() - t0 < 5
        assert name in str(info.value), str(info.value)
    with pytest.raises(openai.BadRequestError, match="give one constraint"):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=5,
            extra_body={"guided_regex": "a", "guided_choice": ["b"]},
        )


def test_cli_passes_a_constraint(server: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["generate", "--target", server.target, "--regex", "[a-c]{3}-[0-9]{2}", "x"]) == 0
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", capsys.readouterr().out.strip())
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert (
        cli_main(["generate", "--target", server.target, "--json-schema", f"@{schema}", "--max-tokens", "120", "x"])
        == 0
    )
    jsonschema.validate(json.loads(capsys.readouterr().out.strip()), SCHEMA)
