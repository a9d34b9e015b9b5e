"""Prompt building, the same for every door and every call that needs it (Generate and Tokenize).

Raw text is encoded with the tokenizer's special tokens (a BOS where the model adds
one); a conversation is rendered with the chat template, which writes its own special
tokens, so it is encoded without adding more. Token ids are used as they are.
"""

from __future__ import annotations

from attnserve.model.tokenizer import Tokenizer
from attnserve.server.api.validation import FieldError, Prompt, RequestInvalid


def render_chat(tokenizer: Tokenizer, prompt: Prompt) -> str:
    try:
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in prompt.messages])
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
