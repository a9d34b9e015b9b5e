"""A generation request as the scheduler sees it: plain Python, no torch, no grpc."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks taken back; waits to recompute its tokens
    FINISHED_STOPPED = "finished_stopped"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or the model's maximum length
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the client or the server
    FINISHED_DEADLINE = "finished_deadline"  # the client's deadline passed
    FINISHED_ERROR = "finished_error"  # the step that served it failed

    @property
    def is_finished(self) -> bool:
        return self.value.startswith("finished")


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    DEADLINE = "deadline"
    ERROR = "error"


FINISHED_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
    FinishReason.DEADLINE: RequestStatus.FINISHED_DEADLINE,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
}


class HeadReduction(enum.Enum):
    NONE = "none"  # one row per head
    MEAN = "mean"
    MAX = "max"


@dataclass(frozen=True)
class AttentionOptions:
    """Which attention weights to return with each token."""

    layers: tuple[int, ...]
    reduction: HeadReduction = HeadReduction.MEAN
    include_prompt: bool = False


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
    attention: AttentionOptions | None = None


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
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")

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
