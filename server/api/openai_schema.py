"""The OpenAI-compatible request bodies (pydantic), and their translation to the door-neutral
GenerationRequest. Types are checked here; ranges and limits by server/api/validation.py.

Non-OpenAI options come as extra body fields (the SDK's ``extra_body``): top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, prompt_logprobs, priority, attention,
residuals, logit_lens, steering, ablations and return_token_ids.
Known OpenAI features this server does not implement are refused (400), never ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from attnserve.server.api.inspection import (
    AblationSpec,
    InspectionSpec,
    LensSpec,
    ResidualSpec,
    SteeringSpec,
    float32_bytes,
)
from attnserve.server.api.records import AttentionSpec, ChatTurn, ConstraintSpec, FieldError, GenerationRequest
from attnserve.server.api.tools import ToolSpec

# Integer fields hold exactly what their gRPC twins can (proto types in generate.proto): a value
# outside is a 400 naming the field here, as it is an INVALID_ARGUMENT there.
UInt32 = Annotated[int, Field(ge=0, lt=1 << 32)]
Int32 = Annotated[int, Field(ge=-(1 << 31), lt=1 << 31)]
UInt64 = Annotated[int, Field(ge=0, lt=1 << 64)]
Int64 = Annotated[int, Field(ge=-(1 << 63), lt=1 << 63)]


class AttentionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[Int32]
    head_reduction: Literal["none", "mean", "max"] | None = None
    include_prompt: bool = False
    dtype: Literal["float16", "float32"] | None = None
    top_k: UInt32 = 0
    spans: list[tuple[UInt32, UInt32]] = []  # [[start, end), ...]: each row's sum over each span


class ResidualsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    points: list[str]  # resid_pre, attn_out, resid_mid, mlp_out, resid_post
    layers: list[Int32]
    include_prompt: bool = False
    dtype: Literal["float16", "float32"] | None = None


class LogitLensBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: list[Int32]
    top_k: UInt32 | None = None
    include_prompt: bool = False


class SteeringBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: Int32
    vector: list[float]  # hidden_size numbers (GET /v1/models/{id} tells the size)
    scale: float | None = None
    point: str | None = None  # resid_pre (default), resid_mid, resid_post
    positions: str | None = None  # all (default), prompt, generated


class AblationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: Int32
    heads: list[UInt32]
    scale: float = 0.0


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCallBody(BaseModel):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCallBody(BaseModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallBody


class FunctionBody(BaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # enforced either way when a call is forced


class ToolBody(BaseModel):
    type: Literal["function"]
    function: FunctionBody


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessageBody(BaseModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None  # an assistant turn's calls, sent back in the conversation
    tool_call_id: str | None = None  # a tool turn: the call whose result it carries

    def turn(self) -> ChatTurn:
        calls = json.dumps([c.model_dump() for c in self.tool_calls]) if self.tool_calls else ""
        role = "system" if self.role == "developer" else self.role
        return ChatTurn(role, self.text(), tool_calls_json=calls, tool_call_id=self.tool_call_id or "")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields at their defaults are harmless

    model: str | None = None
    max_tokens: UInt32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: UInt32 | None = None
    seed: UInt64 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Extensions (extra_body).
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int64] | None = None
    prompt_logprobs: UInt32 | None = None
    priority: Int32 = 0
    attention: AttentionBody | None = None
    residuals: ResidualsBody | None = None
    logit_lens: LogitLensBody | None = None
    steering: list[SteeringBody] = []
    ablations: list[AblationBody] = []
    return_token_ids: bool = False  # vLLM's name: each choice (and chunk) also carries its token_ids
    # Structured output: OpenAI's response_format, and vLLM's guided_* extra fields (at most one in all).
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> ConstraintSpec | list[FieldError] | None:
        """The one constraint asked for (None: none); errors if several are."""
        found: list[ConstraintSpec] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(ConstraintSpec("json_object", field="response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                return [FieldError("response_format.json_schema.schema", None, "is required with type json_schema")]
            # strict or not, the schema is enforced: a constrained sampler cannot produce anything else.
            found.append(ConstraintSpec("json_schema", json.dumps(rf.json_schema.schema_), field="response_format"))
        if self.guided_json is not None:
            value = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            found.append(ConstraintSpec("json_schema", value, field="guided_json"))
        if self.guided_regex is not None:
            found.append(ConstraintSpec("regex", self.guided_regex, field="guided_regex"))
        if self.guided_choice is not None:
            found.append(ConstraintSpec("choice", choices=tuple(self.guided_choice), field="guided_choice"))
        if self.guided_grammar is not None:
            found.append(ConstraintSpec("grammar", self.guided_grammar, field="guided_grammar"))
        if len(found) > 1:
            names = ", ".join(c.field for c in found)
            return [FieldError(found[1].field, "...", f"give one constraint, not several ({names})")]
        return found[0] if found else None

    def unsupported(self) -> list[FieldError]:
        """OpenAI features asked for that this server does not implement, and options that make no sense."""
        errors = []
        if self.stream_options is not None and not self.stream:
            errors.append(FieldError("stream_options", "...", "is only allowed with stream: true"))
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                errors.append(FieldError(name, getattr(self, name), "is not supported (use repetition_penalty)"))
        if self.logit_bias:
            errors.append(FieldError("logit_bias", "...", "is not supported"))
        for name in ("tools", "functions", "suffix"):
            if (self.model_extra or {}).get(name) not in (None, [], {}, {"type": "text"}):
                errors.append(FieldError(name, "...", "is not supported by this server"))
        constraint = self.constraint()
        if isinstance(constraint, list):
            errors.extend(constraint)
        return errors

    def common(self, max_tokens: int | None, logprobs: int | None) -> GenerationRequest:
        a = self.attention
        constraint = self.constraint()
        return GenerationRequest(
            constraint=constraint if isinstance(constraint, ConstraintSpec) else None,
            model=self.model or "",
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or ()),
            stop_token_ids=list(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            attention=None
            if a is None
            else AttentionSpec(
                a.layers, a.head_reduction, a.include_prompt, a.dtype, a.top_k, [tuple(s) for s in a.spans]
            ),
            n=self.n,
            priority=self.priority,
            inspection=self.inspection(),
        )

    def inspection(self) -> InspectionSpec | None:
        r, g = self.residuals, self.logit_lens
        spec = InspectionSpec(
            residuals=None if r is None else ResidualSpec(r.points, r.layers, r.include_prompt, r.dtype),
            logit_lens=None if g is None else LensSpec(g.layers, g.top_k, g.include_prompt),
            steering=[
                SteeringSpec(s.layer, float32_bytes(s.vector), s.point, s.scale, s.positions) for s in self.steering
            ],
            ablations=[AblationSpec(a.layer, a.heads, a.scale) for a in self.ablations],
        )
        return None if spec.is_empty else spec


class CompletionBody(_Common):
    prompt: str | list[Int64] | list[str] | list[list[Int64]]
    logprobs: UInt32 | None = None
    echo: bool = False
    best_of: int | None = None

    def to_request(self) -> GenerationRequest | list[FieldError]:
        errors = self.unsupported()
        if self.echo:
            errors.append(FieldError("echo", True, "is not supported"))
        if self.best_of not in (None, 1, self.n):
            errors.append(FieldError("best_of", self.best_of, "is not supported"))
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                errors.append(FieldError("prompt", len(prompt), "send one prompt per request (a list of one)"))
            prompt = prompt[0]
        if errors:
            return errors
        request = self.common(self.max_tokens, self.logprobs)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.token_ids = list(prompt)  # type: ignore[arg-type]
        return request


class ChatBody(_Common):
    messages: list[ChatMessageBody]
    max_completion_tokens: UInt32 | None = None
    logprobs: bool = False
    top_logprobs: UInt32 | None = None
    tools: list[ToolBody] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def to_request(self) -> GenerationRequest | list[FieldError]:
        errors = self.unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            errors.append(FieldError("top_logprobs", self.top_logprobs, "needs logprobs: true"))
        if errors:
            return errors
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        request = self.common(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
        request.messages = [m.turn() for m in self.messages]
        request.tools = [
            ToolSpec(
                t.function.name, t.function.description or "", json.dumps(t.function.parameters or {"type": "object"})
            )
            for t in self.tools or ()
        ]
        if isinstance(self.tool_choice, NamedToolChoice):
            request.tool_choice, request.tool_choice_name = "function", self.tool_choice.function.name
        elif self.tool_choice is not None:
            request.tool_choice = self.tool_choice
        request.parallel_tool_calls = self.parallel_tool_calls is not False
        return request
