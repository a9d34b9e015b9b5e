"""Prompt building, the same for every door and every call that needs it (Generate and Tokenize).

Raw text is encoded with the tokenizer's special tokens (a BOS where the model adds
one); a conversation is rendered with the chat template, which writes its own special
tokens, so it is encoded without adding more. Token ids are used as they are.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from attnserve.model.tokenizer import Tokenizer
from attnserve.server.api.records import ChatTurn, FieldError, Prompt, RequestInvalid
from attnserve.server.api.tools import messages_for_template, template_renders_tools


def _turn(turn: ChatTurn) -> dict[str, Any]:
    """One turn as chat templates read it (transformers' convention: a call's arguments as a mapping)."""
    out: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.tool_calls_json:
        calls = json.loads(turn.tool_calls_json)
        for call in calls:
            function = call.get("function", {})
            with contextlib.suppress(ValueError, TypeError):
                function["arguments"] = json.loads(function.get("arguments") or "{}")
        out["tool_calls"] = calls
    if turn.tool_call_id:
        out["tool_call_id"] = turn.tool_call_id
    return out


def render_chat(tokenizer: Tokenizer, prompt: Prompt) -> str:
    try:
        turns = [_turn(m) for m in prompt.messages]
        renders_tools = template_renders_tools(tokenizer.chat_template)
        has_tool_turns = any(m.tool_calls_json or m.role == "tool" for m in prompt.messages)
        if prompt.tools or has_tool_turns:
            turns = messages_for_template(turns, prompt.tools, renders_tools=renders_tools)
        tools = [t.openai() for t in prompt.tools] if renders_tools and prompt.tools else None
        return tokenizer.apply_chat_template(turns, tools=tools)
    except Exception as exc:  # a template's raise_exception(): the conversation breaks its rules
        raise RequestInvalid(
            [FieldError("messages", None, f"the chat template rejects this conversation: {exc}")]
        ) from exc


def prompt_token_ids(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """The token ids the model sees for this prompt. Raises RequestInvalid if a chat template refuses it."""
    if prompt.kind == "token_ids":
        return list(prompt.token_ids)
    if prompt.kind == "messages":
        return tokenizer.encode(render_chat(tokenizer, prompt), add_special_tokens=False)
    return tokenizer.encode(prompt.text or "")
