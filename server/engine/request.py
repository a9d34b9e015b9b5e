"""A generation request as the scheduler sees it: plain Python, no torch, no grpc."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks taken back; waits to recompute its tokens
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or the model's maximum length
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the client or by an Abort call
    FINISHED_SHUTDOWN = "finished_shutdown"  # cut by the server's drain timeout
    FINISHED_STALLED = "finished_stalled"  # its reader stopped reading for too long
    FINISHED_DEADLINE = "finished_deadline"  # the client's deadline passed
    FINISHED_ERROR = "finished_error"  # the step that served it failed

    @property
    def is_finished(self) -> bool:
        return self.value.startswith("finished")


# gRPC cancels a handler when the client's deadline passes, a hair before our own copy of that
# deadline: a cancel this close to it counts as a deadline.
DEADLINE_SLACK_S = 0.05


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"  # the client went away, or an Abort call
    SHUTDOWN = "shutdown"  # the server stopped before it finished
    STALLED = "stalled"  # its stream was not read for too long
    DEADLINE = "deadline"
    ERROR = "error"
    # The request's constraint left no legal next token (or its matcher failed): the output so far
    # is returned as it is, rather than sampling outside the constraint or waiting forever.
    CONSTRAINT = "constraint"

    @property
    def is_complete(self) -> bool:
        """The answer is whole (a stop condition ended it), not cut short."""
        return self in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.CONSTRAINT)


FINISHED_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
    FinishReason.SHUTDOWN: RequestStatus.FINISHED_SHUTDOWN,
    FinishReason.STALLED: RequestStatus.FINISHED_STALLED,
    FinishReason.DEADLINE: RequestStatus.FINISHED_DEADLINE,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
    FinishReason.CONSTRAINT: RequestStatus.FINISHED_STOPPED,
}


class HeadReduction(enum.Enum):
    NONE = "none"  # one row per head
    MEAN = "mean"
    MAX = "max"


class WeightsDtype(enum.Enum):
    FLOAT16 = "float16"
    FLOAT32 = "float32"

    @property
    def num_bytes(self) -> int:
        return 2 if self is WeightsDtype.FLOAT16 else 4


@dataclass(frozen=True)
class AttentionOptions:
    """Which attention weights to return with each token."""

    layers: tuple[int, ...]
    reduction: HeadReduction = HeadReduction.MEAN
    include_prompt: bool = False
    dtype: WeightsDtype = WeightsDtype.FLOAT16
    top_k: int = 0  # 0: whole rows; else each row's k largest weights and their positions
    spans: tuple[tuple[int, int], ...] = ()  # instead of rows: each row's sum over each [start, end)


class SteerPositions(enum.Enum):
    PROMPT = "prompt"
    GENERATED = "generated"  # the rows of generated tokens (positions from the prompt's length on)
    ALL = "all"


@dataclass(frozen=True)
class ResidualReads:
    """Residual-stream vectors to return: at these points of these layers, for the row behind each
    generated token (and every prompt row with ``include_prompt``)."""

    points: tuple[str, ...]  # TransformerLens names: resid_pre, attn_out, resid_mid, mlp_out, resid_post
    layers: tuple[int, ...]
    include_prompt: bool = False
    dtype: WeightsDtype = WeightsDtype.FLOAT32


@dataclass(frozen=True)
class LogitLens:
    """Each layer's output put through the final norm and the unembedding: the top_k tokens and probabilities."""

    layers: tuple[int, ...]
    top_k: int = 5
    include_prompt: bool = False


@dataclass(frozen=True)
class Steering:
    """``scale * vector`` added to the residual at ``point`` of ``layer`` on the chosen positions."""

    layer: int
    point: str  # resid_pre, resid_mid or resid_post
    vector: bytes  # little-endian float32, hidden_size values
    scale: float = 1.0
    positions: SteerPositions = SteerPositions.ALL


@dataclass(frozen=True)
class HeadAblation:
    """The outputs of ``heads`` at ``layer`` multiplied by ``scale`` (0: removed), on every position."""

    layer: int
    heads: tuple[int, ...]
    scale: float = 0.0


@dataclass(frozen=True)
class Interventions:
    steering: tuple[Steering, ...] = ()
    ablations: tuple[HeadAblation, ...] = ()

    @property
    def cache_key(self) -> bytes:
        """Names these interventions in the prefix cache: their K/V are not a plain request's."""
        digest = hashlib.sha256(b"interventions-v1")
        for s in self.steering:
            digest.update(f"s|{s.layer}|{s.point}|{s.scale!r}|{s.positions.value}|".encode() + s.vector)
        for a in self.ablations:
            digest.update(f"a|{a.layer}|{a.heads}|{a.scale!r}".encode())
        return digest.digest()


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"  # value: the schema, JSON text
    JSON_OBJECT = "json_object"  # any JSON object; no value
    REGEX = "regex"  # value: the regular expression the whole output matches
    CHOICE = "choice"  # choices: the output is exactly one of them
    GRAMMAR = "grammar"  # value: a Lark grammar (llguidance's dialect)


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match. ``grammar`` is the compiled form (llguidance's grammar
    text), filled in by the service after compiling off the event loop; the runner builds one
    matcher per completion from it."""

    kind: ConstraintKind
    value: str = ""
    choices: tuple[str, ...] = ()
    grammar: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping parameters of one request, already checked by the doors (server/api/validation.py)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; n >= 0 = chosen token plus top-n
    prompt_logprobs: int | None = None  # None = none; n >= 0 = each prompt token's logprob plus top-n
    attention: AttentionOptions | None = None
    residuals: ResidualReads | None = None
    logit_lens: LogitLens | None = None
    interventions: Interventions | None = None
    constraint: Constraint | None = None  # None: unconstrained (pays nothing)

    @property
    def needs_every_prompt_position(self) -> bool:
        """Prompt rows (attention, logprobs, residuals, lens) are asked for: the prompt is computed in
        full, no prefix reuse."""
        return (
            self.prompt_logprobs is not None
            or (self.attention is not None and self.attention.include_prompt)
            or (self.residuals is not None and self.residuals.include_prompt)
            or (self.logit_lens is not None and self.logit_lens.include_prompt)
        )

    @property
    def kv_salt(self) -> bytes:
        """b"" for K/V that any plain request may share; else the key of the interventions that shaped it."""
        return b"" if self.interventions is None else self.interventions.cache_key


@dataclass
class Request:
    """One sequence being served. Token bookkeeping follows one rule: the first
    ``num_computed_tokens`` of ``all_token_ids`` have K/V in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    deadline: float | None = None  # same clock as arrival_time
    priority: int = 0  # lower runs first
    # A sibling (another completion of the same prompt) whose prefill this one waits for,
    # so that it finds the prompt's blocks in the prefix cache instead of recomputing them.
    shares_prompt_with: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    num_prompt_reported: int = 0  # prompt positions whose rows (attention, logprobs) went out
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None
    arrival_index: int = 0  # set by the scheduler: ties within a priority go first come, first served

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")

    @property
    def order(self) -> tuple[int, int]:
        """Scheduling order: priority, then arrival."""
        return (self.priority, self.arrival_index)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def stop_token_ids(self) -> Sequence[int]:
        return (
            self.params.stop_token_ids if self.params.ignore_eos else (*self.eos_token_ids, *self.params.stop_token_ids)
        )
