"""Request validation shared by every front door: a wire-neutral request in, engine parameters
or a list of field errors out.

A door turns its wire message into a :class:`GenerationRequest` and calls

    checked = validate(request, facts, limits)        # before any tokenizing: cheap
    ...tokenize checked.prompt...
    params = fit_prompt(checked, num_prompt_tokens, facts)   # the checks that need the length

Both return a list of :class:`FieldError` instead when something is wrong. Each error
names the field by its neutral path (``temperature``, ``token_ids[3]``,
``messages[0].role``), the value and the limit; a door renames the path into its own
wire names (gRPC ``sampling.temperature``, HTTP ``temperature``) and picks the status.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from attnserve.server.engine.records import EngineInfo
from attnserve.server.engine.request import AttentionOptions, HeadReduction, SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")
HEAD_REDUCTIONS = {"none": HeadReduction.NONE, "mean": HeadReduction.MEAN, "max": HeadReduction.MAX}


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits the doors enforce (server flags)."""

    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_logprobs: int = 20
    max_request_id_chars: int = 256
    default_max_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_stop_strings", "max_stop_string_chars", "max_request_id_chars", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class AttentionSpec:
    """Attention options as sent: layers may be negative, reduction is a name (None = mean)."""

    layers: Sequence[int]
    head_reduction: str | None = None
    include_prompt: bool = False


@dataclass
class GenerationRequest:
    """A generation request as a door received it, before any check. ``None`` means "not sent"."""

    prompt: str | None = None
    messages: Sequence[ChatTurn] | None = None
    token_ids: Sequence[int] | None = None
    model: str = ""
    request_id: str = ""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = not asked; n = chosen token plus the top n
    attention: AttentionSpec | None = None


@dataclass(frozen=True)
class FieldError:
    field: str  # neutral path: "temperature", "token_ids[3]", "messages[0].role"
    value: object
    message: str  # what is wrong and the limit

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class RequestInvalid(ValueError):
    """Raised by a door with the errors of one request."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = list(errors)


@dataclass(frozen=True)
class Prompt:
    """Exactly one way the prompt was given. ``kind`` names the field."""

    kind: str  # "prompt", "messages" or "token_ids"
    text: str | None = None
    messages: tuple[ChatTurn, ...] = ()
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check that does not need its token count."""

    request_id: str
    prompt: Prompt
    params: SamplingParams  # max_tokens is provisional until fit_prompt
    max_tokens_sent: bool


@dataclass
class _Errors:
    items: list[FieldError] = field(default_factory=list)

    def check(self, ok: bool, name: str, value: object, message: str) -> None:
        if not ok:
            self.items.append(FieldError(name, value, message))


def validate(request: GenerationRequest, facts: EngineInfo, limits: RequestLimits) -> CheckedRequest | list[FieldError]:
    """Every check that does not need the prompt's token count. Does no tokenizing."""
    errors = _Errors()
    for check in _CHECKS:
        check(request, facts, limits, errors)
    if errors.items:
        return errors.items
    return CheckedRequest(
        request_id=request.request_id,
        prompt=_prompt_of(request),
        params=_params(request, facts, limits),
        max_tokens_sent=request.max_tokens is not None,
    )


def fit_prompt(checked: CheckedRequest, num_prompt_tokens: int, facts: EngineInfo) -> SamplingParams | list[FieldError]:
    """The checks that need the prompt's length: it and max_tokens fit the context."""
    kind, context = checked.prompt.kind, facts.context_length
    if num_prompt_tokens == 0:
        return [FieldError(kind, 0, "tokenizes to no tokens")]
    if num_prompt_tokens >= context:
        return [
            FieldError(
                kind,
                num_prompt_tokens,
                f"the prompt has {num_prompt_tokens} tokens; the context length is {context}, "
                f"so a prompt may have at most {context - 1}",
            )
        ]
    room = context - num_prompt_tokens
    max_tokens = checked.params.max_tokens
    if not checked.max_tokens_sent:
        return replace(checked.params, max_tokens=min(max_tokens, room))
    if max_tokens > room:
        return [
            FieldError(
                "max_tokens",
                max_tokens,
                f"{max_tokens} does not fit: the context length is {context} and the prompt has "
                f"{num_prompt_tokens} tokens, so at most {room}",
            )
        ]
    return checked.params


# ---------------------------------------------------------------- the checks
Check = Callable[[GenerationRequest, EngineInfo, RequestLimits, _Errors], None]


def _check_identity(r: GenerationRequest, facts: EngineInfo, limits: RequestLimits, e: _Errors) -> None:
    e.check(
        not r.model or r.model == facts.model_name,
        "model",
        r.model,
        f"{r.model!r} is not served here; this server serves {facts.model_name!r} (or leave model empty)",
    )
    e.check(
        len(r.request_id) <= limits.max_request_id_chars,
        "request_id",
        len(r.request_id),
        f"{len(r.request_id)} characters; the limit is {limits.max_request_id_chars}",
    )


def _check_input(r: GenerationRequest, facts: EngineInfo, limits: RequestLimits, e: _Errors) -> None:
    given = [name for name in ("prompt", "messages", "token_ids") if getattr(r, name) is not None]
    if len(given) != 1:
        e.check(False, "input", given, "set one of prompt, messages or token_ids")
        return
    if r.prompt is not None:
        e.check(bool(r.prompt), "prompt", "", "must not be empty")
    elif r.messages is not None:
        e.items.extend(check_messages(r.messages))
    else:
        ids = r.token_ids or ()
        e.check(bool(ids), "token_ids", [], "must not be empty")
        e.items.extend(_check_vocab("token_ids", ids, facts.vocab_size))


def check_messages(messages: Sequence[ChatTurn]) -> list[FieldError]:
    """A conversation's shape: at least one turn, known roles."""
    if not messages:
        return [FieldError("messages", [], "must hold at least one message")]
    return [
        FieldError(f"messages[{i}].role", m.role, f"unknown role {m.role!r} (use {', '.join(CHAT_ROLES)})")
        for i, m in enumerate(messages)
        if m.role not in CHAT_ROLES
    ]


def _check_vocab(name: str, ids: Sequence[int], vocab: int) -> Iterator[FieldError]:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            yield FieldError(f"{name}[{i}]", t, f"{t} is outside the vocabulary [0, {vocab})")


def _check_sampling(r: GenerationRequest, facts: EngineInfo, limits: RequestLimits, e: _Errors) -> None:
    if r.temperature is not None:
        t = r.temperature
        e.check(math.isfinite(t) and t >= 0, "temperature", t, f"must be a finite number >= 0, got {t}")
    if r.top_k is not None:
        e.check(r.top_k >= 0, "top_k", r.top_k, f"must be >= 0 (0 = off), got {r.top_k}")
    if r.top_p is not None:
        e.check(0 < r.top_p <= 1, "top_p", r.top_p, f"must be in (0, 1], got {r.top_p}")
    if r.min_p is not None:
        e.check(0 <= r.min_p <= 1, "min_p", r.min_p, f"must be in [0, 1], got {r.min_p}")
    if r.repetition_penalty is not None:
        p = r.repetition_penalty
        e.check(math.isfinite(p) and p > 0, "repetition_penalty", p, f"must be a finite number > 0 (1 = off), got {p}")


def _check_stopping(r: GenerationRequest, facts: EngineInfo, limits: RequestLimits, e: _Errors) -> None:
    if r.max_tokens is not None:
        e.check(r.max_tokens >= 1, "max_tokens", r.max_tokens, "must be >= 1")
    e.check(
        len(r.stop) <= limits.max_stop_strings,
        "stop",
        len(r.stop),
        f"{len(r.stop)} stop strings; the limit is {limits.max_stop_strings}",
    )
    for i, stop in enumerate(r.stop):
        e.check(
            0 < len(stop) <= limits.max_stop_string_chars,
            f"stop[{i}]",
            len(stop),
            f"must have 1 to {limits.max_stop_string_chars} characters, has {len(stop)}",
        )
    e.items.extend(_check_vocab("stop_token_ids", r.stop_token_ids, facts.vocab_size))


def _check_logprobs(r: GenerationRequest, facts: EngineInfo, limits: RequestLimits, e: _Errors) -> None:
    if r.logprobs is not None:
        e.check(
            0 <= r.logprobs <= limits.max_logprobs,
            "logprobs",
            r.logprobs,
            f"{r.logprobs} is outside [0, {limits.max_logprobs}]",
        )


def _check_attention(r: GenerationRequest, facts: EngineInfo, limits: RequestLimits, e: _Errors) -> None:
    a = r.attention
    if a is None:
        return
    n = facts.num_layers
    e.check(len(a.layers) > 0, "attention.layers", [], f"name at least one layer (0..{n - 1}, or -1)")
    for i, layer in enumerate(a.layers):
        e.check(
            -n <= layer < n,
            f"attention.layers[{i}]",
            layer,
            f"layer {layer} does not exist: the model has {n} layers (0..{n - 1}, or -{n}..-1)",
        )
    e.check(
        a.head_reduction is None or a.head_reduction in HEAD_REDUCTIONS,
        "attention.head_reduction",
        a.head_reduction,
        f"unknown value {a.head_reduction!r} (use {', '.join(HEAD_REDUCTIONS)})",
    )


_CHECKS: tuple[Check, ...] = (
    _check_identity,
    _check_input,
    _check_sampling,
    _check_stopping,
    _check_logprobs,
    _check_attention,
)


# ------------------------------------------------------------ the conversion
def _prompt_of(r: GenerationRequest) -> Prompt:
    if r.prompt is not None:
        return Prompt("prompt", text=r.prompt)
    if r.messages is not None:
        return Prompt("messages", messages=tuple(r.messages))
    return Prompt("token_ids", token_ids=tuple(r.token_ids or ()))


def _params(r: GenerationRequest, facts: EngineInfo, limits: RequestLimits) -> SamplingParams:
    attention = None
    if r.attention is not None:
        layers = tuple(sorted({layer % facts.num_layers for layer in r.attention.layers}))
        reduction = HEAD_REDUCTIONS[r.attention.head_reduction or "mean"]
        attention = AttentionOptions(layers, reduction, r.attention.include_prompt)
    return SamplingParams(
        temperature=1.0 if r.temperature is None else r.temperature,
        top_k=r.top_k or 0,
        top_p=1.0 if r.top_p is None else r.top_p,
        min_p=r.min_p or 0.0,
        repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
        seed=r.seed,
        max_tokens=limits.default_max_tokens if r.max_tokens is None else r.max_tokens,
        stop=tuple(r.stop),
        stop_token_ids=tuple(r.stop_token_ids),
        ignore_eos=r.ignore_eos,
        logprobs=r.logprobs,
        attention=attention,
    )
