"""A token's raw bytes: the pieces of a multi-byte character are its bytes, not U+FFFD."""

from __future__ import annotations

import pytest

from attnserve.model.tokenizer import Tokenizer

TEXTS = ["héllo → 世界", "emoji 🙂 and ZWJ 👩‍👩‍👧", "plain ascii", "tabs\tand\nnewlines"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_token_bytes_concatenate_to_the_text(text: str) -> None:
    tokenizer = Tokenizer.byte_level(384)
    ids = tokenizer.encode(text)
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()
    assert any("\ufffd" in tokenizer.token_text(i) for i in ids) == any(ord(c) > 127 for c in text)


def test_special_tokens_are_their_text() -> None:
    tokenizer = Tokenizer.byte_level(384)
    assert tokenizer.token_bytes(2) == b"<|im_end|>"
