"""From scheduler deltas to what a client reads: text deltas, stop strings, usage, timings.

Runs on the engine thread. Stop strings need text, so they are matched here (the
scheduler knows only token ids): a match finishes the request before the next step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from attnserve.model.detokenizer import IncrementalDetokenizer, StopStringMatcher
from attnserve.model.tokenizer import Tokenizer
from attnserve.server.engine.records import AttentionRow, LensRow, RequestDelta, ResidualRow, TokenLogprobs
from attnserve.server.engine.request import FinishReason, Request


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Timings:
    queue_s: float  # arrival -> first scheduled
    ttft_s: float | None  # arrival -> first token
    total_s: float  # arrival -> finish
    prefill_s: float | None = None  # first scheduled -> first token
    decode_s: float | None = None  # first token -> finish


@dataclass
class RequestOutput:
    """One message of a request's stream; the last one has ``finish_reason`` set."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    attention: list[AttentionRow] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    residuals: list[ResidualRow] = field(default_factory=list)
    lens: list[LensRow] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    usage: Usage | None = None
    timings: Timings | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_attention_bytes(self) -> int:
        """Bytes of the inspection payloads (attention, residuals, lens): what the budgets count."""
        rows = (*self.attention, *self.residuals, *self.lens)
        return sum(row.num_bytes for row in rows)

    def extend(self, later: RequestOutput) -> None:
        """Append a later output of the same request: how every whole response is built (Engine.generate,
        both doors' unary answers). Lists grow in place; the end's fields come from the output that has them."""
        self.token_ids += later.token_ids
        self.text += later.text
        self.logprobs += later.logprobs
        self.attention += later.attention
        self.prompt_logprobs += later.prompt_logprobs
        self.residuals += later.residuals
        self.lens += later.lens
        self.finish_reason = later.finish_reason or self.finish_reason
        self.stop_reason = later.stop_reason if later.stop_reason is not None else self.stop_reason
        self.usage = later.usage or self.usage
        self.timings = later.timings or self.timings
        self.error = later.error or self.error


def merged_output(outputs: Iterable[RequestOutput]) -> RequestOutput:
    """One request's stream outputs as one, in order (the outputs themselves are left as they are)."""
    merged: RequestOutput | None = None
    for out in outputs:
        if merged is None:
            merged = RequestOutput(out.request_id)
        merged.extend(out)
    if merged is None:
        raise ValueError("no outputs to merge")
    return merged


class OutputProcessor:
    """Per-request text state."""

    def __init__(self, tokenizer: Tokenizer, request: Request) -> None:
        self.request = request
        self._detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        self._stops = StopStringMatcher(request.params.stop)

    def process(self, delta: RequestDelta) -> RequestOutput:
        """Turn a delta into an output; sets ``finish_reason`` STOP if a stop string matched."""
        out = RequestOutput(
            delta.request_id,
            list(delta.new_token_ids),
            "",
            delta.logprobs,
            delta.attention,
            prompt_logprobs=delta.prompt_logprobs,
            residuals=delta.residuals,
            lens=delta.lens,
        )
        stop_tokens = self.request.stop_token_ids()
        text = []
        for token in delta.new_token_ids:
            if delta.finish_reason is FinishReason.STOP and token in stop_tokens:
                out.stop_reason = token  # the stop token itself is not text
                continue
            text.append(self._detok.push(token))
        reason = delta.finish_reason
        released = self._stops.feed("".join(text))
        if reason is not None and self._stops.stopped is None:
            # Last message: release what was held for an incomplete character or a possible stop string.
            released += self._stops.feed(self._detok.flush())
            if self._stops.stopped is None:
                released += self._stops.flush()
        if self._stops.stopped is not None:
            reason, out.stop_reason = FinishReason.STOP, self._stops.stopped
        out.text = released
        out.finish_reason = reason
        return out
