"""Prometheus metrics, named after vLLM's so dashboards and autoscaling rules carry over.

Everything lives in one registry served on its own port at /metrics. The engine
calls the observer hooks; the servicer records failures that never reach the engine.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from attnserve.server.engine.outputs import RequestOutput
from attnserve.server.engine.records import EngineStats, StepStats
from attnserve.server.engine.request import FinishReason, Request

if TYPE_CHECKING:
    from attnserve.server.api.attention_budget import AttentionBudget
    from attnserve.server.engine.core import Engine

_FAILURE_REASON = {FinishReason.ABORT: "cancelled"}  # vLLM's label for a request its client abandoned

disable_created_metrics()  # no *_created series: they double every counter for no dashboard's benefit

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, vllm_names: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The three gauges the Kubernetes inference gateway's endpoint picker reads, under the
        # names it already knows for vLLM (its default model-server protocol), when asked.
        self.gateway_gauges = (
            [
                Gauge("vllm:num_requests_waiting", "Requests waiting (attnserve, vLLM's name).", registry=r),
                Gauge("vllm:num_requests_running", "Requests running (attnserve, vLLM's name).", registry=r),
                Gauge("vllm:kv_cache_usage_perc", "KV cache usage 0-1 (attnserve, vLLM's name).", registry=r),
            ]
            if vllm_names
            else []
        )
        self.running = Gauge("attnserve_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("attnserve_num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge("attnserve_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", registry=r)
        self.prompt_tokens = Counter("attnserve_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("attnserve_generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter(
            "attnserve_request_success", "Requests finished normally.", ["finished_reason"], registry=r
        )
        self.failure = Counter(
            "attnserve_request_failure", "Requests that failed or were cut short.", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "attnserve_time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "attnserve_inter_token_latency_seconds",
            "Time between a request's tokens.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "attnserve_e2e_request_latency_seconds", "Arrival to finish.", buckets=_REQUEST_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "attnserve_request_queue_time_seconds", "Arrival to first scheduled.", buckets=_REQUEST_BUCKETS, registry=r
        )
        self.prefill = Histogram(
            "attnserve_request_prefill_time_seconds",
            "First scheduled to first token.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "attnserve_request_decode_time_seconds", "First token to finish.", buckets=_REQUEST_BUCKETS, registry=r
        )
        # vLLM calls this one iteration_tokens_total; a histogram may not end in _total
        # (promtool rejects it), so ours drops the suffix.
        self.iteration_tokens = Histogram(
            "attnserve_iteration_tokens", "Tokens scheduled per engine step.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.step_time = Histogram(
            "attnserve_engine_step_seconds", "Duration of one engine step.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.preemptions = Counter("attnserve_num_preemptions", "Requests preempted (to recompute later).", registry=r)
        self.prefix_queries = Counter(
            "attnserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter(
            "attnserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r
        )
        self.attention_requests = Counter(
            "attnserve_attention_requests", "Requests that asked for attention.", registry=r
        )
        self.attention_bytes = Counter("attnserve_attention_payload_bytes", "Attention weight bytes sent.", registry=r)
        self.attention_reserved = Gauge(
            "attnserve_attention_memory_reserved_bytes",
            "Attention memory held by admitted requests (of --attention-memory-budget).",
            registry=r,
        )
        self.paused = Gauge(
            "attnserve_num_requests_paused", "Running requests held back because their reader is behind.", registry=r
        )
        self.backlog = Gauge(
            "attnserve_stream_backlog_bytes",
            "Attention bytes produced for streams but not yet taken by their readers.",
            registry=r,
        )
        self._last_token: dict[str, float] = {}
        self._prefix_seen = (0, 0)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])

    # ------------------------------------------------------------ engine hooks
    def bind_engine(self, engine: Engine) -> None:
        """Read the gauges from the engine at scrape time, so they are never stale (an abort
        that leaves nothing to run still shows up at once)."""
        stats = _ScrapeStats(engine)
        self.running.set_function(lambda: stats.get().num_running)
        self.waiting.set_function(lambda: stats.get().num_waiting)
        self.kv_usage.set_function(lambda: stats.get().kv_cache_usage)
        self.paused.set_function(lambda: stats.get().num_paused)
        if self.gateway_gauges:
            waiting, running, kv = self.gateway_gauges
            waiting.set_function(lambda: stats.get().num_waiting)
            running.set_function(lambda: stats.get().num_running)
            kv.set_function(lambda: stats.get().kv_cache_usage)
        self.backlog.set_function(lambda: stats.get().stream_backlog_bytes)
        engine.step_observers.append(self.on_step)
        engine.output_observers.append(self.on_output)

    def bind_attention_budget(self, budget: AttentionBudget) -> None:
        self.attention_reserved.set_function(lambda: budget.reserved)

    def on_step(self, stats: StepStats) -> None:
        self.iteration_tokens.observe(stats.num_batched_tokens)
        self.step_time.observe(stats.duration_s)
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        seen_q, seen_h = self._prefix_seen
        self.prefix_queries.inc(stats.prefix_queries - seen_q)
        self.prefix_hits.inc(stats.prefix_hits - seen_h)
        self._prefix_seen = (stats.prefix_queries, stats.prefix_hits)

    def on_output(self, request: Request, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.token_ids:
            self.generation_tokens.inc(len(out.token_ids))
            last = self._last_token.get(request.request_id)
            if last is not None:
                self.itl.observe((now - last) / len(out.token_ids))
            self._last_token[request.request_id] = now
        self.attention_bytes.inc(out.num_attention_bytes)
        if out.finish_reason is None:
            return
        self._last_token.pop(request.request_id, None)
        self.prompt_tokens.inc(request.num_prompt_tokens)
        if request.params.attention is not None:
            self.attention_requests.inc()
        if out.finish_reason.is_complete:
            self.success.labels(finished_reason=out.finish_reason.value).inc()
        else:
            self.failure.labels(reason=_FAILURE_REASON.get(out.finish_reason, out.finish_reason.value)).inc()
        t = out.timings
        if t is not None:
            self.e2e.observe(t.total_s)
            self.queue.observe(t.queue_s)
            if t.ttft_s is not None:
                self.ttft.observe(t.ttft_s)
            if t.prefill_s is not None:
                self.prefill.observe(t.prefill_s)
            if t.decode_s is not None:
                self.decode.observe(t.decode_s)

    def on_rejected(self, reason: str) -> None:
        """A request refused before it reached the engine (invalid, queue full, draining...)."""
        self.failure.labels(reason=reason).inc()


class _ScrapeStats:
    """One ``engine.stats()`` per scrape, shared by the gauges that read it: a snapshot younger
    than a few milliseconds is reused (every gauge of one scrape is read within that)."""

    MAX_AGE_S = 0.005

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.taken = -1.0
        self.snapshot: EngineStats | None = None

    def get(self) -> EngineStats:
        now = time.monotonic()
        if self.snapshot is None or now - self.taken > self.MAX_AGE_S:
            self.snapshot, self.taken = self.engine.stats(), now
        return self.snapshot
