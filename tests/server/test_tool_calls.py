"""Tool calling through the OpenAI door with the real SDK: a real server process (the tiny random
model, whose ChatML template has no tools of its own, so the Hermes convention is used). A forced
choice (``required`` or a named function) must always give a parsing call with valid arguments."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from attnserve.client import AttnserveError, Client
from attnserve.model.tokenizer import CHATML_TEMPLATE, Tokenizer
from attnserve.server.api.prompts import render_chat
from attnserve.server.api.records import ChatTurn, Prompt
from attnserve.server.api.tools import HERMES, LLAMA3, MISTRAL, ToolCallParser, ToolSpec, parse_whole
from attnserve.v1 import generate_pb2 as pb
from tests.server.server_process import ServerProcess

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time now", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "64MiB"]
    proc = ServerProcess(args).start(tmp_path_factory.mktemp("tools") / "server.log")
    try:
        yield proc.wait_serving()
    finally:
        proc.stop()


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)


def valid_calls(calls: Any, names: set[str]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [None, 1, 2])
def test_named_tool_choice_always_gives_a_valid_call(server: ServerProcess, seed: int | None) -> None:
    sampling = {"temperature": 1.0, "seed": seed} if seed is not None else {"temperature": 0.0}
    reply = sdk(server).chat.completions.create(
        model="tiny",
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=200,
        **sampling,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    valid_calls(choice.message.tool_calls, {"get_time"})


@pytest.mark.slow
def test_required_with_and_without_parallel_calls(server: ServerProcess) -> None:
    client = sdk(server)
    for parallel in (False, True):
        reply = client.chat.completions.create(
            model="tiny",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=240,
        )
        choice = reply.choices[0]
        # Parallel: the random model may keep calling until max_tokens cuts it ("length").
        assert choice.finish_reason == "tool_calls" or (parallel and choice.finish_reason == "length"), choice
        calls = choice.message.tool_calls or []
        assert 1 <= len(calls) <= (4 if parallel else 1)
        valid_calls(calls, {"get_weather", "get_time"})


@pytest.mark.slow
def test_streamed_tool_call_deltas_reassemble_to_the_unary_answer(server: ServerProcess) -> None:
    client = sdk(server)
    ask: dict[str, Any] = dict(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        temperature=0.0,
    )
    whole = client.chat.completions.create(**ask).choices[0].message.tool_calls
    assert whole is not None
    calls: dict[int, dict[str, str]] = {}
    finish = None
    pieces = 0
    for chunk in client.chat.completions.create(**ask, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            entry = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            if piece.id:
                entry["id"] = piece.id
            if piece.function and piece.function.name:
                entry["name"] = piece.function.name
            if piece.function and piece.function.arguments:
                entry["arguments"] += piece.function.arguments
                pieces += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert pieces > 1, "arguments should stream in pieces"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


@pytest.mark.slow
def test_a_tool_result_round_trips_and_none_answers_in_text(server: ServerProcess) -> None:
    client = sdk(server)
    first = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,  # type: ignore[arg-type]
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    conversation: list[dict[str, Any]] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model="tiny",
        messages=conversation,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,  # type: ignore[arg-type]
    )
    choice = second.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
    # auto: the model decides; text without a call comes back as content.
    third = client.chat.completions.create(
        model="tiny",
        messages=conversation,
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=8,  # type: ignore[arg-type]
    )
    assert third.choices[0].message.tool_calls is None and third.choices[0].finish_reason in ("stop", "length")
    assert isinstance(third.choices[0].message.content, str)


@pytest.mark.slow
def test_bad_tool_requests_are_400(server: ServerProcess) -> None:
    client = sdk(server)
    with pytest.raises(openai.BadRequestError, match="names no function"):
        client.chat.completions.create(
            model="tiny",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.BadRequestError, match="needs tools"):
        client.chat.completions.create(model="tiny", messages=ASK, tool_choice="required")  # type: ignore[arg-type]
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]
    with pytest.raises(openai.BadRequestError, match="tools: cannot be compiled"):
        client.chat.completions.create(model="tiny", messages=ASK, tools=bad, tool_choice="required")  # type: ignore[arg-type]


# -------------------------------------------------------------- no server
def test_tools_reach_the_prompt_of_a_template_without_tools_and_of_one_with() -> None:
    tok = Tokenizer.byte_level(300)
    spec = ToolSpec("get_time", "Time now", json.dumps(TIME))
    turns = (
        ChatTurn("user", "hi"),
        ChatTurn(
            "assistant",
            "",
            tool_calls_json=json.dumps(
                [{"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]
            ),
        ),
        ChatTurn("tool", "12:00", tool_call_id="c1"),
    )
    text = render_chat(tok, Prompt("messages", messages=turns, tools=(spec,)))
    assert tok.chat_template == CHATML_TEMPLATE
    assert "<tools>" in text and '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>' in text
    assert "<tool_response>\n12:00\n</tool_response>" in text
    tok.chat_template = (
        "{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
        "{% endfor %}"
    )
    text = render_chat(tok, Prompt("messages", messages=turns, tools=(spec,)))
    assert text.startswith("TOOL get_time;") and 'CALL get_time {"zone": "UTC"}' in text


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (
            HERMES,
            'Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": "}\\""}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
        ),
        (HERMES, '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call> tail'),
        (MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {"a": [1, 2]}}, {"name": "g", "arguments": {}}]'),
        (LLAMA3, '{"name": "f", "parameters": {"q": "x"}}'),
        (LLAMA3, '<|python_tag|>{"name": "f", "parameters": {"q": "x"}}'),
        (HERMES, "plain text < with a partial <tool"),
    ],
)
def test_parser_stream_equals_whole(fmt: str, text: str) -> None:
    content, calls = parse_whole(text, fmt)
    parser, streamed, args = ToolCallParser(fmt), "", {}
    for ch in text:
        delta = parser.feed(ch)
        streamed += delta.content
        for piece in delta.calls:
            args[piece.index] = args.get(piece.index, "") + piece.arguments
    streamed += parser.finish().content
    assert streamed == content
    assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in calls]
    assert list(args.values()) == [c.arguments for c in calls]
    for call in calls:
        json.loads(call.arguments)


# ------------------------------------------------------------------- gRPC
@pytest.mark.slow
def test_grpc_named_and_required_tool_calls_unary_and_streamed(server: ServerProcess) -> None:
    with Client(server.target, timeout=60) as client:
        for choice, names in (("get_weather", {"get_weather"}), ("required", {"get_weather", "get_time"})):
            ask: dict[str, Any] = dict(messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=200)
            reply = client.generate(parallel_tool_calls=False, **ask)
            (completion,) = reply.completions
            assert completion.finish_reason == pb.FINISH_REASON_TOOL_CALLS
            assert len(completion.tool_calls) == 1
            call = completion.tool_calls[0]
            assert call.name in names and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
            streamed: dict[int, list[str]] = {}
            finish = None
            for message in client.generate_stream(parallel_tool_calls=False, **ask):
                for piece in message.tool_calls:
                    entry = streamed.setdefault(piece.index, ["", ""])
                    entry[0] = piece.name or entry[0]
                    entry[1] += piece.arguments
                finish = message.finish_reason or finish
            assert finish == pb.FINISH_REASON_TOOL_CALLS
            assert [tuple(v) for v in streamed.values()] == [(c.name, c.arguments) for c in completion.tool_calls]
        # The call and its result go back; tool_choice none answers in text.
        conversation = [
            *ASK,
            {"role": "assistant", "content": "", "tool_calls": list(completion.tool_calls)},
            {"role": "tool", "tool_call_id": call.id, "content": "21 C"},
        ]
        reply = client.generate(messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=8)
        assert not reply.completions[0].tool_calls
        assert reply.completions[0].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


@pytest.mark.slow
def test_grpc_bad_tools_are_invalid_argument(server: ServerProcess) -> None:
    with Client(server.target, timeout=60) as client:
        request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")])
        request.tools.add(name="f", parameters_json="{oops")
        with pytest.raises(AttnserveError, match=r"tools\[0\].parameters: must be a JSON schema"):
            client.send(request)
        request = pb.GenerateRequest(prompt="hi", tool_choice=pb.TOOL_CHOICE_REQUIRED)
        request.tools.add(name="f")
        with pytest.raises(AttnserveError, match="tools need messages"):
            client.send(request)
