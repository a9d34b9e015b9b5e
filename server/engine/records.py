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

from collections.abc import Mapping
from dataclasses import dataclass, field

from attnserve.server.engine.request import FinishReason, SamplingParams, WeightsDtype


@dataclass
class ScheduledRequest:
    """One request's share of a step: what the runner needs, nothing more."""

    request_id: str
    token_ids: list[int]  # the new tokens to compute
    num_computed_tokens: int  # position of token_ids[0]
    block_table: list[int]  # the request's own list, not a copy: read it during this step only
    params: SamplingParams
    num_output_tokens: int  # generated so far: the seeded sampler's step
    num_prompt_tokens: int
    is_sampling: bool  # this chunk ends at the last known token: sample the next one
    all_token_ids: list[int] | None = None  # only when a repetition penalty needs them
    # Prompt rows (attention, prompt logprobs) are due for positions >= this; None = none due.
    # (A request recomputed after preemption does not report its prompt twice.)
    report_prompt_from: int | None = None
    next_token_id: int | None = None  # the known token after this chunk (prompt logprobs of its last row)
    # The first entries of block_table released out of a sliding window (now the null block); only grows.
    num_released_blocks: int = 0

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + len(self.token_ids)


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # finished since the last plan: the runner forgets them

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class TokenLogprobs:
    logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]
    token_id: int | None = None  # set for prompt logprobs (a generated token's id travels beside it)


@dataclass
class AttentionRow:
    """Attention weights of one query position at one layer: little-endian ``dtype`` bytes of shape
    (heads or 1, context_len)."""

    layer: int
    position: int
    num_heads: int
    context_len: int
    weights: bytes
    dtype: WeightsDtype = WeightsDtype.FLOAT32
    num_kept: int = 0  # top-k rows: the columns kept per head (weights is (heads, num_kept)); 0: whole rows
    positions: bytes = b""  # top-k rows: little-endian int32 key positions, (heads, num_kept)
    num_spans: int = 0  # span sums: weights is (heads, num_spans); 0: not span sums

    @property
    def num_bytes(self) -> int:
        return len(self.weights) + len(self.positions)


@dataclass
class ResidualRow:
    """One residual-stream vector: ``point`` of ``layer`` at ``position``, little-endian ``dtype`` bytes (hidden,)."""

    point: str
    layer: int
    position: int
    values: bytes
    dtype: WeightsDtype = WeightsDtype.FLOAT32

    @property
    def num_bytes(self) -> int:
        return len(self.values)


@dataclass
class LensRow:
    """The logit lens of ``layer`` at ``position``: the top tokens, most probable first, and their probabilities."""

    layer: int
    position: int
    token_ids: list[int]
    probs: list[float]

    @property
    def num_bytes(self) -> int:
        return 12 * len(self.token_ids)  # int64 id + float32 probability each, as counted at admission


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    attention: dict[str, list[AttentionRow]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    residuals: dict[str, list[ResidualRow]] = field(default_factory=dict)
    lens: dict[str, list[LensRow]] = field(default_factory=dict)
    constraint_done: set[str] = field(default_factory=set)  # its constraint is complete: the request stops
    constraint_dead: dict[str, str] = field(default_factory=dict)  # no legal token: its token is dropped, it ends


@dataclass
class RequestDelta:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    attention: list[AttentionRow] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    residuals: list[ResidualRow] = field(default_factory=list)
    lens: list[LensRow] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What the engine serves, for the front doors and metrics: fixed once it is built."""

    model_name: str  # reported by GetModelInfo, /v1/models and every response
    architecture: str
    context_length: int
    vocab_size: int
    max_token_chars: int  # longest vocabulary entry: bounds a prompt's tokens from below by its characters
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int  # the residual stream's width: steering vectors and residual reads
    dtype: str
    device: str
    kv_cache_blocks: int
    kv_cache_block_size: int
    kv_cache_bytes: int
    max_num_seqs: int
    max_num_waiting: int
    max_num_batched_tokens: int
    max_stream_backlog_bytes: int  # attention bytes a reader may fall behind by before its request pauses
    layer_windows: tuple[int, ...]  # per layer: its sliding window, 0 = the whole context
    batch_invariant: bool  # a request's tokens do not depend on its batch, chunking or the prefix cache
    determinism: str  # the path in use and what the start-up check found, in words
    tensor_parallel_size: int = 1  # ranks the model is split across
    generation_defaults: Mapping[str, float] = field(default_factory=dict)  # the model's generation_config.json
    model_aliases: tuple[str, ...] = ()  # other names a request may send as `model`


@dataclass(frozen=True)
class EngineStats:
    """The engine's load right now."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by requests
    num_free_blocks: int
    num_preemptions: int
    num_paused: int  # running requests held back because their reader is behind
    stream_backlog_bytes: int  # attention bytes produced but not yet taken by the doors


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
