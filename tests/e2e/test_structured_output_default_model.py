"""Structured output and tool calls on the default model through the real openai SDK: every strict
json_schema answer over a varied prompt set parses and validates; a named tool choice gives a valid
call; tool_choice auto on a prompt that needs no tool answers in text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.server.server_process import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("smollm")]

PROMPTS = [
    "Describe the city of Paris.",
    "Tell me about a famous scientist.",
    "Invent a fantasy character.",
    "What is your favourite book?",
    "Give me a recipe idea.",
    "Describe a car you like.",
]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "summary": {"type": "string", "maxLength": 120},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "summary", "rating", "tags"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}}
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[ServerProcess]:
    args = ["--model", str(default_gguf), "--dtype", "float32", "--kv-cache-memory", "256MiB"]
    proc = ServerProcess(args).start(tmp_path_factory.mktemp("structured") / "server.log")
    try:
        yield proc.wait_serving(timeout=240)
    finally:
        proc.stop()


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_strict_json_schema_answers_always_validate(server: ServerProcess) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "card", "schema": SCHEMA, "strict": True}}
    for prompt in PROMPTS:
        reply = sdk(server).chat.completions.create(
            model=server_model(server),
            messages=[{"role": "user", "content": prompt}],
            response_format=fmt,  # type: ignore[arg-type]
            max_tokens=200,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_named_tool_call_and_auto_answering_in_text(server: ServerProcess) -> None:
    client = sdk(server)
    reply = client.chat.completions.create(
        model=server_model(server),
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    reply = client.chat.completions.create(
        model=server_model(server),
        messages=[{"role": "user", "content": "Say hello."}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="auto",
        max_tokens=40,
    )
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.message.content


def server_model(server: ServerProcess) -> str:
    return sdk(server).models.list().data[0].id
