"""Request validation shared by every front door: a wire-neutral request in, engine parameters
or a list of field errors out.

A door turns its wire message into a :class:`GenerationRequest` (server/api/records.py) and
the service calls

    checked = validate(request, rules)                     # before any templating or tokenizing: cheap
    ...tokenize checked.prompt...
    fitted = fit_prompt(checked, num_prompt_tokens, rules, whole_response=...)  # needs the length

Both return a list of :class:`FieldError` instead when something is wrong. Each error
names the field by its neutral path (``temperature``, ``token_ids[3]``,
``messages[0].role``), the value and the limit; a door renames the path into its own
wire names (gRPC ``sampling.temperature``, HTTP ``temperature``) and picks the status.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from attnserve.server.api import inspection
from attnserve.server.api.attention_budget import AttentionShape, how_to_shrink
from attnserve.server.api.records import (
    ChatTurn,
    CheckedRequest,
    FieldError,
    FittedRequest,
    GenerationRequest,
    Prompt,
    ServingRules,
)
from attnserve.server.api.tools import forcing_grammar
from attnserve.server.engine.records import EngineInfo
from attnserve.server.engine.request import (
    AttentionOptions,
    Constraint,
    ConstraintKind,
    HeadReduction,
    SamplingParams,
    WeightsDtype,
)

CHAT_ROLES = ("system", "user", "assistant", "tool")
HEAD_REDUCTIONS = {"none": HeadReduction.NONE, "mean": HeadReduction.MEAN, "max": HeadReduction.MAX}
WEIGHTS_DTYPES = {"float16": WeightsDtype.FLOAT16, "float32": WeightsDtype.FLOAT32}
# A temperature this small divides logits into inf/nan: it means greedy, as in vLLM.
GREEDY_BELOW_TEMPERATURE = 1e-5
# Bytes a generated token costs in a whole response beyond its attention: id, text, framing.
_RESPONSE_BYTES_PER_TOKEN = 32
_RESPONSE_BYTES_PER_LOGPROB = 12


CONSTRAINT_KINDS = {kind.value: kind for kind in ConstraintKind}
MAX_CONSTRAINT_CHARS = 256 << 10  # a schema, regex or grammar (the engine compiles within its own bounds too)
MAX_CHOICES = 4096


@dataclass
class _Errors:
    items: list[FieldError] = field(default_factory=list)

    def check(self, ok: bool, name: str, value: object, message: str) -> None:
        """Record an error unless ``ok``."""
        if not ok:
            self.items.append(FieldError(name, value, message))


def validate(request: GenerationRequest, rules: ServingRules) -> CheckedRequest | list[FieldError]:
    """Every check that does not need the prompt's token count. Does no templating or tokenizing."""
    errors = _Errors()
    for check in _CHECKS:
        check(request, rules, errors)
    if errors.items:
        return errors.items
    return CheckedRequest(
        request_id=request.request_id,
        prompt=_prompt_of(request),
        params=_params(request, rules),
        max_tokens_sent=request.max_tokens is not None,
        n=request.n or 1,
        priority=request.priority,
        parses_tool_calls=bool(request.tools) and request.tool_choice != "none",
    )


def fit_prompt(
    checked: CheckedRequest, num_prompt_tokens: int, rules: ServingRules, *, whole_response: bool
) -> FittedRequest | list[FieldError]:
    """The checks that need the prompt's length: it and max_tokens fit the context, the attention
    weights fit the per-request cap, and a whole (unstreamed) response fits one message."""
    kind, context = checked.prompt.kind, rules.facts.context_length
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
    params = checked.params
    if not checked.max_tokens_sent:
        params = replace(params, max_tokens=min(params.max_tokens, room))
    elif params.max_tokens > room:
        return [
            FieldError(
                "max_tokens",
                params.max_tokens,
                f"{params.max_tokens} does not fit: the context length is {context} and the prompt has "
                f"{num_prompt_tokens} tokens, so at most {room}",
            )
        ]
    payload = _Payload.of(params, num_prompt_tokens, checked.n, rules.facts)
    errors = _check_attention_size(payload, rules) or _check_inspection_size(params, payload, checked.n, rules)
    if not errors and whole_response:
        errors = _check_response_size(params, payload, num_prompt_tokens, checked.n, rules)
    return errors or FittedRequest(params, payload.num_bytes)


@dataclass(frozen=True)
class _Payload:
    """What a request asked to see, sized once for every check that needs it."""

    attention: AttentionShape | None
    inspection_bytes: int  # residual reads and lens rows

    @classmethod
    def of(cls, params: SamplingParams, num_prompt_tokens: int, n: int, facts: EngineInfo) -> _Payload:
        shape = None
        if params.attention is not None:
            shape = AttentionShape.of(
                params.attention,
                num_prompt_tokens=num_prompt_tokens,
                max_tokens=params.max_tokens,
                num_completions=n,
                num_heads=facts.num_heads,
            )
        return cls(shape, inspection.payload_bytes(params, num_prompt_tokens, n, facts.hidden_size))

    @property
    def attention_bytes(self) -> int:
        return self.attention.num_bytes if self.attention else 0

    @property
    def num_bytes(self) -> int:
        return self.attention_bytes + self.inspection_bytes


def _check_attention_size(payload: _Payload, rules: ServingRules) -> list[FieldError]:
    shape, cap = payload.attention, rules.limits.max_attention_bytes_per_request
    if shape is None or shape.num_bytes <= cap:
        return []
    return [
        FieldError(
            "attention",
            shape.num_bytes,
            f"these weights would take {shape.num_bytes:,} bytes ({shape.describe()}); the limit is {cap:,} "
            f"bytes per request: {how_to_shrink(shape)}",
        )
    ]


def _check_inspection_size(params: SamplingParams, payload: _Payload, n: int, rules: ServingRules) -> list[FieldError]:
    """Residual vectors and lens rows count against the same per-request cap as attention weights."""
    size, total, cap = payload.inspection_bytes, payload.num_bytes, rules.limits.max_attention_bytes_per_request
    if not size or total <= cap:
        return []
    return [
        FieldError(
            "residuals" if params.residuals is not None else "logit_lens",
            size,
            f"these reads would take {size:,} bytes ({inspection.describe(params)}, over {n} x {params.max_tokens} "
            f"generated tokens); with attention {total:,}; the limit is {cap:,} bytes per request: ask for fewer "
            "layers, points or max_tokens, float16 values, or no prompt rows",
        )
    ]


def _check_response_size(
    params: SamplingParams, payload: _Payload, num_prompt_tokens: int, n: int, rules: ServingRules
) -> list[FieldError]:
    per_token = _RESPONSE_BYTES_PER_TOKEN + _RESPONSE_BYTES_PER_LOGPROB * (1 + (params.logprobs or 0))
    size = payload.num_bytes + n * params.max_tokens * per_token
    if params.prompt_logprobs is not None:
        size += num_prompt_tokens * _RESPONSE_BYTES_PER_LOGPROB * (1 + params.prompt_logprobs)
    limit = rules.limits.max_response_bytes
    if size <= limit:
        return []
    return [
        FieldError(
            "attention" if payload.attention else "max_tokens",
            size,
            f"the whole response could reach {size:,} bytes; one response message holds at most {limit:,}: "
            "use GenerateStream (stream: true), which sends it in parts",
        )
    ]


# ---------------------------------------------------------------- the checks
Check = Callable[[GenerationRequest, ServingRules, _Errors], None]


MAX_ATTENTION_SPANS = 64

# Request ids are written into the one-line-per-request log: printable ASCII without spaces, so
# no id can end a line, start a forged one, or carry terminal escapes.
_SAFE_ID = re.compile(r"[\x21-\x7e]*")


def _check_identity(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
    name, limit = rules.facts.model_name, rules.limits.max_request_id_chars
    e.check(
        not r.model or r.model == name or r.model in rules.facts.model_aliases,
        "model",
        r.model,
        f"{r.model!r} is not served here; this server serves {name!r} (or leave model empty)",
    )
    e.check(
        len(r.request_id) <= limit,
        "request_id",
        len(r.request_id),
        f"{len(r.request_id)} characters; the limit is {limit}",
    )
    if len(r.request_id) <= limit:
        e.check(
            _SAFE_ID.fullmatch(r.request_id) is not None,
            "request_id",
            r.request_id.encode("ascii", "backslashreplace").decode()[:64],
            "may hold only printable ASCII characters without spaces (0x21-0x7E)",
        )


def _check_input(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
    given = [name for name in ("prompt", "messages", "token_ids") if getattr(r, name) is not None]
    if len(given) != 1:
        e.check(False, "input", given, "set one of prompt, messages or token_ids")
        return
    facts = rules.facts
    if r.prompt is not None:
        e.check(bool(r.prompt), "prompt", "", "must not be empty")
        e.items.extend(check_text(Prompt("prompt", text=r.prompt), facts))
    elif r.messages is not None:
        errors = check_messages(r.messages)
        e.items.extend(errors or check_text(Prompt("messages", messages=tuple(r.messages)), facts))
    else:
        ids = r.token_ids or ()
        e.check(bool(ids), "token_ids", [], "must not be empty")
        if len(ids) >= facts.context_length:  # before the per-id loop: a huge list is refused in O(1)
            e.check(
                False, "token_ids", len(ids), f"{len(ids)} ids; a prompt may have at most {facts.context_length - 1}"
            )
        else:
            e.items.extend(_check_vocab("token_ids", ids, facts.vocab_size))


def check_text(prompt: Prompt, facts: EngineInfo) -> list[FieldError]:
    """A prompt's text (or messages) before any templating or tokenizing: its size, then its Unicode."""
    errors = check_text_size(prompt, facts)
    if errors:
        return errors
    texts = [(prompt.kind, prompt.text or "")] + [
        (f"messages[{i}].content", m.content) for i, m in enumerate(prompt.messages)
    ]
    return [error for name, text in texts if (error := unicode_error(name, text)) is not None]


def unicode_error(name: str, text: str) -> FieldError | None:
    """A lone UTF-16 surrogate (valid in JSON's \\u escapes, not in Unicode text) would reach the
    tokenizer, which cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return FieldError(
            name,
            f"character {exc.start}",
            f"holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}: "
            "text must be valid Unicode",
        )
    return None


def check_text_size(prompt: Prompt, facts: EngineInfo) -> list[FieldError]:
    """A text longer than context x the longest token cannot fit, whatever it tokenizes to:
    refuse it before spending time on templating or tokenizing it."""
    num_chars = len(prompt.text or "") + sum(len(m.content) for m in prompt.messages)
    limit = (facts.context_length - 1) * facts.max_token_chars
    if num_chars <= limit:
        return []
    return [
        FieldError(
            prompt.kind,
            num_chars,
            f"{num_chars:,} characters cannot fit: the context length is {facts.context_length} tokens and no token "
            f"is longer than {facts.max_token_chars} characters, so at most {limit:,} characters",
        )
    ]


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
    """The first id outside the vocabulary, and how many more there are (one error, not thousands)."""
    bad = [i for i, t in enumerate(ids) if not 0 <= t < vocab]
    if bad:
        i, more = bad[0], f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        yield FieldError(f"{name}[{i}]", ids[i], f"{ids[i]} is outside the vocabulary [0, {vocab}){more}")


def _check_sampling(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
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
    if r.n is not None:
        limit = rules.limits.max_n
        e.check(1 <= r.n <= limit, "n", r.n, f"{r.n} completions; must be 1 to {limit}")


def _check_stopping(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
    limits = rules.limits
    if r.max_tokens is not None:
        e.check(r.max_tokens >= 1, "max_tokens", r.max_tokens, "must be >= 1")
    e.check(
        len(r.stop) <= limits.max_stop_strings,
        "stop",
        len(r.stop),
        f"{len(r.stop)} stop strings; the limit is {limits.max_stop_strings}",
    )
    for i, stop in enumerate(r.stop[: limits.max_stop_strings]):
        e.check(
            0 < len(stop) <= limits.max_stop_string_chars,
            f"stop[{i}]",
            len(stop),
            f"must have 1 to {limits.max_stop_string_chars} characters, has {len(stop)}",
        )
        if (error := unicode_error(f"stop[{i}]", stop)) is not None:
            e.items.append(error)
    e.items.extend(_check_vocab("stop_token_ids", r.stop_token_ids, rules.facts.vocab_size))


def _check_logprobs(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
    limit = rules.limits.max_logprobs
    for name, value in (("logprobs", r.logprobs), ("prompt_logprobs", r.prompt_logprobs)):
        if value is not None:
            e.check(0 <= value <= limit, name, value, f"{value} is outside [0, {limit}]")


def _check_attention(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
    a = r.attention
    if a is None:
        return
    n = rules.facts.num_layers
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
    e.check(
        a.dtype is None or a.dtype in WEIGHTS_DTYPES,
        "attention.dtype",
        a.dtype,
        f"unknown value {a.dtype!r} (use {', '.join(WEIGHTS_DTYPES)})",
    )
    context = rules.facts.context_length
    e.check(
        0 <= a.top_k <= context,
        "attention.top_k",
        a.top_k,
        f"must be 0 (whole rows) to {context} (the context length), got {a.top_k}",
    )
    e.check(
        len(a.spans) <= MAX_ATTENTION_SPANS,
        "attention.spans",
        len(a.spans),
        f"{len(a.spans)} spans; at most {MAX_ATTENTION_SPANS}",
    )
    e.check(not (a.spans and a.top_k), "attention.spans", len(a.spans), "ask for spans or top_k, not both")
    for i, (start, end) in enumerate(a.spans[:MAX_ATTENTION_SPANS]):
        e.check(
            0 <= start < end <= context,
            f"attention.spans[{i}]",
            [start, end],
            f"need 0 <= start < end <= {context} (the context length), got [{start}, {end})",
        )


def _check_inspection(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
    inspection.check(r.inspection, rules.facts, e.check)


def _check_constraint(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
    """Cheap shape checks; compiling (and its bounds) happens later, off the event loop."""
    c = r.constraint
    if c is None:
        return
    if c.kind not in CONSTRAINT_KINDS:
        e.check(False, c.field, c.kind, f"set one kind of constraint: {', '.join(CONSTRAINT_KINDS)}")
        return
    e.check(
        len(c.value) <= MAX_CONSTRAINT_CHARS,
        c.field,
        len(c.value),
        f"{len(c.value):,} characters; the limit is {MAX_CONSTRAINT_CHARS:,}",
    )
    if c.kind in ("json_schema", "regex", "grammar"):
        e.check(bool(c.value.strip()), c.field, "", f"the {c.kind.replace('_', ' ')} is empty")
    if c.kind == "choice":
        e.check(
            1 <= len(c.choices) <= MAX_CHOICES,
            c.field,
            len(c.choices),
            f"{len(c.choices)} choices; give 1 to {MAX_CHOICES}",
        )
        e.check(all(c.choices), c.field, "", "a choice is empty")
        total = sum(len(choice) for choice in c.choices[: MAX_CHOICES + 1])
        e.check(
            total <= MAX_CONSTRAINT_CHARS,
            c.field,
            total,
            f"{total:,} characters; the limit is {MAX_CONSTRAINT_CHARS:,}",
        )
    if (error := unicode_error(c.field, c.value)) is not None:
        e.items.append(error)


TOOL_CHOICES = ("auto", "none", "required", "function")


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


MAX_TOOLS = 128
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _check_tools(r: GenerationRequest, rules: ServingRules, e: _Errors) -> None:
    e.check(r.tool_choice in TOOL_CHOICES, "tool_choice", r.tool_choice, f"use one of {', '.join(TOOL_CHOICES)}")
    if not r.tools:
        e.check(
            r.tool_choice in ("auto", "none"), "tool_choice", r.tool_choice, "a tool choice needs tools to choose from"
        )
        return
    e.check(r.messages is not None, "tools", len(r.tools), "tools need messages (the chat template renders them)")
    e.check(len(r.tools) <= MAX_TOOLS, "tools", len(r.tools), f"{len(r.tools)} tools; the limit is {MAX_TOOLS}")
    names = [t.name for t in r.tools]
    for i, tool in enumerate(r.tools[:MAX_TOOLS]):
        e.check(
            _TOOL_NAME.fullmatch(tool.name) is not None,
            f"tools[{i}].name",
            tool.name[:80],
            "must be 1 to 64 characters of a-z, A-Z, 0-9, _, . and -",
        )
        e.check(names.count(tool.name) == 1, f"tools[{i}].name", tool.name[:80], "is given twice")
        e.check(
            len(tool.parameters_json) <= MAX_CONSTRAINT_CHARS,
            f"tools[{i}].parameters",
            len(tool.parameters_json),
            f"{len(tool.parameters_json):,} characters; the limit is {MAX_CONSTRAINT_CHARS:,}",
        )
        if len(tool.parameters_json) <= MAX_CONSTRAINT_CHARS:
            e.check(
                _is_json_object(tool.parameters_json),
                f"tools[{i}].parameters",
                tool.parameters_json[:80],
                "must be a JSON schema: a JSON object",
            )
    if r.tool_choice == "function":
        e.check(
            r.tool_choice_name in names,
            "tool_choice",
            r.tool_choice_name,
            f"names no function in tools ({', '.join(names[:8])})",
        )
    if r.tool_choice in ("required", "function"):
        e.check(
            r.constraint is None,
            "tool_choice",
            r.tool_choice,
            f"a forced tool call is its own constraint: drop {r.constraint.field if r.constraint else ''}",
        )


_CHECKS: tuple[Check, ...] = (
    _check_identity,
    _check_input,
    _check_sampling,
    _check_stopping,
    _check_logprobs,
    _check_attention,
    _check_inspection,
    _check_tools,
    _check_constraint,
)


# ------------------------------------------------------------ the conversion
def _prompt_of(r: GenerationRequest) -> Prompt:
    if r.prompt is not None:
        return Prompt("prompt", text=r.prompt)
    if r.messages is not None:
        return Prompt("messages", messages=tuple(r.messages), tools=tuple(r.tools) if r.tool_choice != "none" else ())
    return Prompt("token_ids", token_ids=tuple(r.token_ids or ()))


def _params(r: GenerationRequest, rules: ServingRules) -> SamplingParams:
    d, facts = rules.defaults, rules.facts
    attention = None
    if r.attention is not None:
        layers = tuple(sorted({layer % facts.num_layers for layer in r.attention.layers}))
        reduction = HEAD_REDUCTIONS[r.attention.head_reduction or "mean"]
        dtype = WEIGHTS_DTYPES[r.attention.dtype or "float16"]
        attention = AttentionOptions(
            layers, reduction, r.attention.include_prompt, dtype, r.attention.top_k, tuple(r.attention.spans)
        )
    temperature = d.temperature if r.temperature is None else r.temperature
    params = SamplingParams(
        temperature=0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature,
        top_k=d.top_k if r.top_k is None else r.top_k,
        top_p=d.top_p if r.top_p is None else r.top_p,
        min_p=d.min_p if r.min_p is None else r.min_p,
        repetition_penalty=d.repetition_penalty if r.repetition_penalty is None else r.repetition_penalty,
        seed=r.seed,
        max_tokens=rules.limits.default_max_tokens if r.max_tokens is None else r.max_tokens,
        stop=tuple(r.stop),
        stop_token_ids=tuple(r.stop_token_ids),
        ignore_eos=r.ignore_eos,
        logprobs=r.logprobs,
        prompt_logprobs=r.prompt_logprobs,
        attention=attention,
        constraint=_constraint(r, rules),
    )
    return inspection.to_params(params, r.inspection, facts)


def _constraint(r: GenerationRequest, rules: ServingRules) -> Constraint | None:
    """The request's constraint: its own, or the grammar that forces a tool call (required / named)."""
    if r.tools and r.tool_choice in ("required", "function"):
        name = r.tool_choice_name if r.tool_choice == "function" else None
        grammar = forcing_grammar(r.tools, rules.tool_format, name=name, parallel=r.parallel_tool_calls)
        return Constraint(ConstraintKind.GRAMMAR, grammar)
    if r.constraint is None:
        return None
    return Constraint(CONSTRAINT_KINDS[r.constraint.kind], r.constraint.value, tuple(r.constraint.choices))
