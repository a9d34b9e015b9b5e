"""Tool calling, door-neutral: which format a model's chat template uses, the tools in the prompt
when the template does not render them itself, the grammar that forces a call (tool_choice
``required`` or a named function), and the parser that finds calls in the output, whole or as a
stream of OpenAI-style deltas.

Formats (by what the chat template writes):
- ``hermes`` (Qwen 2/2.5/3, Hermes, and the fallback for templates without tools):
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.
- ``llama3``: a bare JSON object ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``).

A forced call is generated under a grammar whose JSON parts are compact (", " and ": "), so its
arguments stream as they are written and the whole answer parses by construction.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HERMES, MISTRAL, LLAMA3 = "hermes", "mistral", "llama3"
MAX_PARALLEL_CALLS = 4  # a forced "required" answer with parallel calls: at most this many
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# What a template without tools of its own is given: the Hermes convention, as a system turn.
_HERMES_SYSTEM = (
    "You may call functions. Their signatures:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with one block per call:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call (OpenAI's ``tools[i].function``)."""

    name: str
    description: str = ""
    parameters_json: str = '{"type": "object"}'  # a JSON schema, JSON text

    def openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": json.loads(self.parameters_json),
            },
        }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def template_format(template: str | None) -> str:
    """The tool-call format a chat template writes (hermes where it names none)."""
    source = template or ""
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<|python_tag|>" in source or "ipython" in source:
        return LLAMA3
    return HERMES


def template_renders_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def hermes_system_prompt(tools: Sequence[ToolSpec]) -> str:
    return _HERMES_SYSTEM.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools))


def messages_for_template(
    turns: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec], *, renders_tools: bool
) -> list[dict[str, Any]]:
    """The conversation as a template without tool support can show it: the tools in a system turn,
    earlier calls as <tool_call> blocks in the assistant's text, results as <tool_response> blocks."""
    if renders_tools:
        return [dict(t) for t in turns]
    out: list[dict[str, Any]] = []
    for turn in turns:
        turn = dict(turn)
        calls = turn.pop("tool_calls", None) or []
        text = turn.get("content") or ""
        if calls:
            blocks = ["<tool_call>\n" + json.dumps(_call_json(c), ensure_ascii=False) + "\n</tool_call>" for c in calls]
            text = "\n".join([text, *blocks] if text else blocks)
        if turn["role"] == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
        turn.pop("tool_call_id", None)
        out.append({**turn, "content": text})
    if tools:
        system = hermes_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _call_json(call: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}


def forcing_grammar(tools: Sequence[ToolSpec], fmt: str, *, name: str | None, parallel: bool) -> str:
    """A Lark grammar (llguidance) whose every sentence is a valid call in ``fmt``: to ``name`` only,
    or to any of ``tools``; one call, or up to MAX_PARALLEL_CALLS when ``parallel``."""
    chosen = [t for t in tools if name is None or t.name == name]
    key = "parameters" if fmt == LLAMA3 else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, key: json.loads(t.parameters_json)},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {"x-guidance": _COMPACT, **schema}
    more = parallel and name is None
    obj = f"obj: %json {json.dumps(schema)}"
    if fmt == MISTRAL:
        rest = f'(", " obj){{0,{MAX_PARALLEL_CALLS - 1}}}' if more else ""
        return f'start: "[TOOL_CALLS][" obj {rest} "]"\n{obj}'
    if fmt == LLAMA3:
        return f"start: obj\n{obj}"  # Llama 3 makes one call per turn
    rest = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if more else ""
    return f'start: call {rest}\ncall: "<tool_call>\\n" obj "\\n</tool_call>"\n{obj}'


# ------------------------------------------------------------------ parsing
@dataclass
class CallDelta:
    """One piece of a streamed call, as OpenAI's ``delta.tool_calls[i]``: the first piece of a call
    carries its id and name, the others pieces of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


_OPEN = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]", LLAMA3: "<|python_tag|>"}
_CLOSE = {HERMES: "</tool_call>"}
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class ToolCallParser:
    """Finds tool calls in a completion's text as it streams (``feed``), then ``finish``.

    Text outside calls is content; a call's arguments are streamed as they arrive (when the call
    writes its name first, as forced calls do); anything that does not parse as a call is given
    back as content, never lost. Feeding a whole text at once gives the same calls as a stream.
    """

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._state = "text"  # text, head, args, tail
        self._raw = ""  # the current call's text since its opening tag
        self._depth = 0
        self._in_string = self._escape = self._value_started = False
        self._started_any = False

    @property
    def opener(self) -> str:
        return _OPEN[self.fmt]

    def feed(self, text: str) -> ParsedDelta:
        self._buffer += text
        out = ParsedDelta()
        steps = {"text": self._text, "head": self._head, "args": self._stream_args, "tail": self._tail}
        while self._buffer:
            before = (self._state, len(self._buffer))
            steps[self._state](out)
            if (self._state, len(self._buffer)) == before:
                break  # needs more text
        return out

    def finish(self) -> ParsedDelta:
        """The end of the text: an unfinished call is given back as content."""
        out = ParsedDelta()
        if self._state == "text":
            out.content = "" if self._started_any and not self._buffer.strip() else self._buffer
        elif self._state in ("head", "args"):
            out.content = self._raw + self._buffer
            if self._state == "args":
                self.calls.pop()  # announced but never finished: not a call
        self._buffer = ""
        return out

    # -- states
    def _text(self, out: ParsedDelta) -> None:
        opener = self.opener
        at = self._buffer.find(opener)
        if self.fmt == LLAMA3 and at < 0 and not self._started_any and self._buffer.lstrip().startswith("{"):
            at, opener = self._buffer.find("{"), ""  # Llama 3 may call without the tag: a bare JSON object
        if at < 0:
            keep = _partial_suffix(self._buffer, self.opener)
            if self._started_any and not self._buffer[: len(self._buffer) - keep].strip():
                return  # whitespace between calls is not content: hold it until something else comes
            out.content += self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return
        if not (self._started_any and not self._buffer[:at].strip()):
            out.content += self._buffer[:at]
        self._buffer = self._buffer[at + len(opener) :]
        if self.fmt == MISTRAL:
            self._buffer = self._buffer.lstrip()
            if self._buffer.startswith("["):
                self._buffer = self._buffer[1:]
        self._raw = opener
        self._state = "head"
        self._started_any = True

    def _head(self, out: ParsedDelta) -> None:
        if self.fmt == MISTRAL and self._buffer.lstrip().startswith("["):
            self._buffer = self._buffer.lstrip()[1:]  # the list of calls opens
        match = _HEAD.match(self._buffer)
        if match is None:
            close = _CLOSE.get(self.fmt)
            if close and close in self._buffer:  # a call that does not start with its name: parse it whole
                body, _, rest = self._buffer.partition(close)
                self._whole(body, out, self._raw + body + close)
                self._buffer = rest
                self._state = "text"
            return
        index = len(self.calls)
        name = json.loads(f'"{match.group(1)}"')
        self.calls.append(ToolCall(new_call_id(), name, ""))
        out.calls.append(CallDelta(index, self.calls[-1].id, name, ""))
        self._raw += self._buffer[: match.end()]
        self._buffer = self._buffer[match.end() :]
        self._depth, self._in_string, self._escape, self._value_started = 0, False, False, False
        self._state = "args"

    def _stream_args(self, out: ParsedDelta) -> None:
        """Stream the arguments' JSON value until it is complete (depth back to 0 outside strings)."""
        taken, done = 0, False
        if not self._value_started:  # whitespace before the value is not part of the arguments
            stripped = self._buffer.lstrip()
            self._raw += self._buffer[: len(self._buffer) - len(stripped)]
            self._buffer = stripped
            if not stripped:
                return
            self._value_started = True
        for ch in self._buffer:
            taken += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
                    done = self._depth == 0
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                done = self._depth == 0
            if done:
                break
        piece, self._buffer = self._buffer[:taken], self._buffer[taken:]
        self._raw += piece
        call = self.calls[-1]
        self.calls[-1] = ToolCall(call.id, call.name, call.arguments + piece)
        if piece:
            out.calls.append(CallDelta(len(self.calls) - 1, arguments=piece))
        if done:
            self._state = "tail"

    def _tail(self, out: ParsedDelta) -> None:
        """After a call's arguments: its closing (the wrapper's brace, a tag, a separator)."""
        if self.fmt == HERMES:
            at = self._buffer.find("</tool_call>")
            if at < 0:
                return
            self._buffer = self._buffer[at + len("</tool_call>") :].lstrip("\n")
            self._state = "text"
        elif self.fmt == MISTRAL:
            stripped = self._buffer.lstrip()
            if not stripped.startswith("}"):
                return
            stripped = stripped[1:].lstrip()
            if stripped.startswith(","):
                self._buffer, self._raw, self._state = stripped[1:], "", "head"
            elif stripped.startswith("]"):
                self._buffer, self._state = stripped[1:], "text"
            elif stripped:
                self._buffer, self._state = stripped, "text"
        else:  # llama3: the object's brace ends it
            stripped = self._buffer.lstrip()
            if stripped.startswith("}"):
                self._buffer, self._state = stripped[1:], "text"

    def _whole(self, body: str, out: ParsedDelta, raw: str) -> None:
        try:
            value = json.loads(body)
            name = value["name"]
            args = value.get("arguments", value.get("parameters", {}))
            assert isinstance(name, str)
        except (ValueError, KeyError, TypeError, AssertionError):
            out.content += raw
            return
        call = ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False))
        out.calls.append(CallDelta(len(self.calls), call.id, call.name, call.arguments))
        self.calls.append(call)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could begin ``tag`` (held back until decided)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parse_whole(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole completion: the same parser as a stream, fed at once."""
    parser = ToolCallParser(fmt)
    first, last = parser.feed(text), parser.finish()
    return first.content + last.content, parser.calls
