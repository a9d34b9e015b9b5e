"""What a request's attention weights cost, known from its shape before any work, and the
server-wide budget that concurrent attention requests share.

A request returns one row per requested layer for each generated token (the query that
predicts it, over every position before it) and, with ``include_prompt``, for every prompt
position. A row at position p has p + 1 weights per head (or one head when reduced).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from attnserve.server.engine.request import AttentionOptions, HeadReduction


@dataclass(frozen=True)
class AttentionShape:
    num_prompt_tokens: int
    max_tokens: int
    num_completions: int
    num_layers: int  # requested
    num_heads: int  # returned per row: the model's heads, or 1 when reduced
    include_prompt: bool
    bytes_per_weight: int
    top_k: int = 0  # 0: whole rows; else at most k weights (and k int32 positions) per head row
    num_spans: int = 0  # span sums: that many weights per head row

    @classmethod
    def of(
        cls, options: AttentionOptions, *, num_prompt_tokens: int, max_tokens: int, num_completions: int, num_heads: int
    ) -> AttentionShape:
        return cls(
            num_prompt_tokens=num_prompt_tokens,
            max_tokens=max_tokens,
            num_completions=num_completions,
            num_layers=len(options.layers),
            num_heads=num_heads if options.reduction is HeadReduction.NONE else 1,
            include_prompt=options.include_prompt,
            bytes_per_weight=options.dtype.num_bytes,
            top_k=options.top_k,
            num_spans=len(options.spans),
        )

    @property
    def num_bytes(self) -> int:
        p, m = self.num_prompt_tokens, self.max_tokens
        rows = self.num_completions * m + (p - 1 if self.include_prompt else 0)
        if self.num_spans:  # one sum per span per head row, whatever its context
            return self.num_layers * self.num_heads * rows * self.num_spans * self.bytes_per_weight
        if self.top_k:  # at most k weights and k positions per head row, whatever its context
            return self.num_layers * self.num_heads * rows * self.top_k * (self.bytes_per_weight + 4)
        # Generated tokens' rows sit at positions p-1 .. p+m-2: contexts p .. p+m-1.
        generated = m * p + m * (m - 1) // 2
        # Prompt rows (once, on the first completion) at positions 0 .. p-2: contexts 1 .. p-1.
        prompt = (p - 1) * p // 2 if self.include_prompt else 0
        weights = self.num_layers * self.num_heads * (self.num_completions * generated + prompt)
        return weights * self.bytes_per_weight

    def describe(self) -> str:
        rows = f"{self.num_prompt_tokens}-token prompt" + (" with its rows" if self.include_prompt else "")
        if self.top_k:
            rows += f", top {self.top_k} per row"
        return (
            f"{self.num_layers} layers x {self.num_heads} head rows over a {rows} and "
            f"{self.num_completions} x {self.max_tokens} generated tokens, {self.bytes_per_weight} bytes per weight"
        )


def how_to_shrink(shape: AttentionShape) -> str:
    tips = ["fewer layers", "fewer max_tokens"]
    if shape.num_heads > 1:
        tips.insert(1, "a head reduction (mean or max)")
    if shape.include_prompt:
        tips.insert(0, "no prompt rows (include_prompt false)")
    if shape.bytes_per_weight > 2:
        tips.append("float16 weights")
    return "ask for " + ", ".join(tips)


class AttentionBudget:
    """Bytes of attention weights the server holds at once, shared by every request that asks.

    A request reserves at admission what it can hold at one time (all of it for a whole
    response; at most the stream backlog bound for a stream) and releases it when done.
    Thread-safe; reservations never block.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._reserved = 0
        self._lock = threading.Lock()

    @property
    def reserved(self) -> int:
        return self._reserved

    def try_reserve(self, num_bytes: int) -> bool:
        with self._lock:
            if self._reserved + num_bytes > self.capacity:
                return False
            self._reserved += num_bytes
            return True

    def release(self, num_bytes: int) -> None:
        with self._lock:
            self._reserved -= num_bytes
            assert self._reserved >= 0, "attention budget released more than reserved"
