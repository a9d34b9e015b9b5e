"""The requests every front door hands to the generation service, as plain records.

A door turns its wire message into a :class:`GenerationRequest` (``None`` = not sent);
validation (server/api/validation.py) checks it against the :class:`ServingRules` and hands
back a :class:`CheckedRequest`, then, once the prompt is tokenized, a :class:`FittedRequest`,
or a list of :class:`FieldError`. The limits and defaults the checks apply live here too:
the server's flags set them (server/config.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from attnserve.server.api.inspection import InspectionSpec
from attnserve.server.api.tools import HERMES, ToolSpec
from attnserve.server.engine.records import EngineInfo
from attnserve.server.engine.request import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits the doors enforce (server flags)."""

    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_logprobs: int = 20
    max_request_id_chars: int = 256
    default_max_tokens: int = 256
    max_n: int = 16
    max_attention_bytes_per_request: int = 64 << 20
    attention_memory_budget: int = 512 << 20  # all requests together (AttentionBudget)
    max_request_bytes: int = 4 << 20  # one request message
    max_response_bytes: int = 64 << 20  # one response message (the gRPC send limit)
    max_constraint_compile_s: float = 5.0  # compiling one constraint (schema, regex, grammar)

    def __post_init__(self) -> None:
        for name in (
            "max_stop_strings",
            "max_stop_string_chars",
            "max_request_id_chars",
            "default_max_tokens",
            "max_n",
            "max_attention_bytes_per_request",
            "attention_memory_budget",
            "max_request_bytes",
            "max_response_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_constraint_compile_s > 0:
            raise ValueError(f"max_constraint_compile_s must be > 0, got {self.max_constraint_compile_s}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")


@dataclass(frozen=True)
class SamplingDefaults:
    """What an unset sampling field means. Greedy by default: a small model sampled at
    temperature 1 rambles, and a first call should answer sensibly."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def overridden(self, values: Mapping[str, object]) -> SamplingDefaults:
        """These defaults with the known fields of ``values`` (a generation_config.json, flags) applied."""
        known = {f.name: f.type for f in fields(self)}
        picked = {k: v for k, v in values.items() if k in known and isinstance(v, int | float)}
        return replace(self, **picked)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ServingRules:
    """Everything a check needs: the engine's facts, the limits and the defaults."""

    facts: EngineInfo
    limits: RequestLimits = field(default_factory=RequestLimits)
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    tool_format: str = HERMES  # how the model's chat template writes tool calls (server/api/tools.py)


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    # An assistant turn's earlier tool calls: OpenAI's tool_calls, as JSON text (a list).
    tool_calls_json: str = ""
    tool_call_id: str = ""  # a tool turn: the call it answers


@dataclass(frozen=True)
class AttentionSpec:
    """Attention options as sent: layers may be negative, reduction is a name (None = mean)."""

    layers: Sequence[int]
    head_reduction: str | None = None
    include_prompt: bool = False
    dtype: str | None = None  # "float16" (None) or "float32"
    top_k: int = 0  # 0: whole rows
    spans: Sequence[tuple[int, int]] = ()  # [start, end) key ranges: each row's sum over each


@dataclass(frozen=True)
class ConstraintSpec:
    """A constraint as sent. ``field`` is where the door found it (its own wire name), so that a
    compile error names what the client wrote: ``constraint.regex``, ``response_format``, ``guided_json``."""

    kind: str  # json_schema, json_object, regex, choice, grammar
    value: str = ""
    choices: Sequence[str] = ()
    field: str = "constraint"


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
    prompt_logprobs: int | None = None
    attention: AttentionSpec | None = None
    n: int | None = None
    priority: int = 0
    inspection: InspectionSpec | None = None  # residual reads, logit lens, steering, ablations
    constraint: ConstraintSpec | None = None
    # Tool calling (messages only): the functions, and "auto", "none", "required" or "function"
    # (then tool_choice_name names it).
    tools: Sequence[ToolSpec] = ()
    tool_choice: str = "auto"
    tool_choice_name: str | None = None
    parallel_tool_calls: bool = True
    # Who sent it, as the door knows the sender (the gRPC door: its connection): only the
    # same caller may Abort it. Not a field of any wire message.
    caller: str = ""


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
    tools: tuple[ToolSpec, ...] = ()  # rendered by the chat template (or a system turn where it has none)


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check that does not need its token count."""

    request_id: str
    prompt: Prompt
    params: SamplingParams  # max_tokens is provisional until fit_prompt
    max_tokens_sent: bool
    n: int
    priority: int
    parses_tool_calls: bool = False  # the door looks for tool calls in the output


@dataclass(frozen=True)
class FittedRequest:
    """A checked request fitted to its prompt's length: the final parameters, and the bytes of
    what it asked to see (attention rows, residual reads, lens rows), sized once here and
    reserved against the server's attention memory by the service."""

    params: SamplingParams
    num_payload_bytes: int = 0
