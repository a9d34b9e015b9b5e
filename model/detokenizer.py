"""Streaming text out of token ids: no broken characters, stop strings held back.

``IncrementalDetokenizer`` turns one token at a time into text deltas. A byte-level
token can end inside a multi-byte UTF-8 character; such text decodes to U+FFFD,
so it is held back until the character completes (TGI's and vLLM's approach: decode
a short window of previous tokens for context and emit only the new suffix).

``StopStringMatcher`` sits after it: text that could be the start of a stop string
is held back until it is decided, so a stop string is never streamed and then
taken back, even when it spans several tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnserve.model.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # tokens of left context; enough for any tokenizer's merge of spaces


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start: context for decoding
        self._read_offset = len(self._ids)  # tokens before this are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # nothing new, or a character still incomplete
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Text still held at the end (an incomplete character decodes to U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]


class StopStringMatcher:
    """Cuts a text stream at the first stop string, holding back possible starts of one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = [s for s in stop if s]
        self._held = ""
        self.stopped: str | None = None  # the stop string that matched

    def feed(self, delta: str) -> str:
        """Add text; return what can be released now. After a match, returns ''."""
        if self.stopped is not None:
            return ""
        text = self._held + delta
        hits = [(text.find(s), s) for s in self._stops if s in text]
        if hits:
            index, self.stopped = min(hits)
            self._held = ""
            return text[:index]
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Release held text at the end of the stream (no stop string completed)."""
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held

    def _longest_partial_suffix(self, text: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
