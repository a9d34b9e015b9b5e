"""The plain records the engine's parts hand each other, and the engine hands the doors.

Within a step:

    plan = scheduler.schedule()              # SchedulerOutput of ScheduledRequests
    out = runner.execute(plan)               # RunnerOutput
    deltas = scheduler.update(plan, out)     # RequestDeltas

To the doors and metrics: ``EngineInfo`` (what is served), ``EngineStats`` (the load now) and
``StepStats`` (what one step did).
No torch, no grpc: the runner turns tensors into these before they leave it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnserve.server.engine.request import FinishReason, SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step: what the runner needs, nothing more."""

    request_id: str
    token_ids: list[int]  # the new tokens to compute
    num_computed_tokens: int  # position of token_ids[0]
    block_table: list[int]
    params: SamplingParams
    num_output_tokens: int  # generated so far: the seeded sampler's step
    is_sampling: bool  # this chunk ends at the last known token: sample the next one
    all_token_ids: list[int] | None = None  # only when a repetition penalty needs them

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + len(self.token_ids)


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class TokenLogprobs:
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class AttentionRow:
    """Attention weights of one query position at one layer, float32 bytes of shape (heads or 1, context_len)."""

    layer: int
    position: int
    num_heads: int
    context_len: int
    weights: bytes


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    attention: dict[str, list[AttentionRow]] = field(default_factory=dict)


@dataclass
class RequestDelta:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    attention: list[AttentionRow] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What the engine serves, for the front doors and metrics: fixed once it is built."""

    model_name: str
    architecture: str
    context_length: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    dtype: str
    device: str
    kv_cache_blocks: int
    kv_cache_block_size: int
    kv_cache_bytes: int
    max_num_seqs: int
    max_num_waiting: int
    max_num_batched_tokens: int


@dataclass(frozen=True)
class EngineStats:
    """The engine's load right now."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by requests
    num_free_blocks: int
    num_preemptions: int


@dataclass
class StepStats:
    """What one step did, for metrics."""

    num_batched_tokens: int
    num_requests: int
    duration_s: float
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preempted: int
    prefix_queries: int  # running totals of the prefix cache
    prefix_hits: int
