"""The engine: a thread that loops schedule -> execute -> update while there is work.

Callers on an asyncio event loop add requests and read each request's outputs
as an async stream; outputs are handed over thread-safely. Aborts are applied at
the start of the next step, so an aborted request's blocks are free within one
step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from attnserve.model.config import ModelConfig
from attnserve.model.invariance import linear_row_invariance_failures
from attnserve.model.loader import LoadedModel
from attnserve.model.native_caches import cap_primitive_caches
from attnserve.server.engine.block_manager import BlockManager
from attnserve.server.engine.config import EngineConfig
from attnserve.server.engine.constraints import ConstraintRows, GrammarCompiler
from attnserve.server.engine.errors import EngineStoppedError
from attnserve.server.engine.outputs import OutputProcessor, RequestOutput, Timings, Usage, merged_output
from attnserve.server.engine.records import (
    EngineInfo,
    EngineStats,
    RequestDelta,
    RunnerOutput,
    SchedulerOutput,
    StepStats,
)
from attnserve.server.engine.request import DEADLINE_SLACK_S, FinishReason, Request, SamplingParams
from attnserve.server.engine.runner import ModelRunner
from attnserve.server.engine.scheduler import Scheduler

log = logging.getLogger("attnserve.engine")
# (model, cache config, batch_invariant=) -> runner: a tensor-parallel server's rank 0 drives its workers.
RunnerFactory = Callable[..., ModelRunner]


def build_engine(
    load: Callable[[], LoadedModel], config: EngineConfig, runner_factory: RunnerFactory = ModelRunner
) -> Engine:
    """Load the model and build the engine in a thread that then exits; the caller starts it.

    Why a thread of its own: torch's CPU thread pool is libgomp's, which keeps its workers
    spinning between parallel regions only while it manages no more threads than there are
    CPUs. A pool left behind by the thread that loaded the model (an executor thread lives on)
    tips it over: the engine's workers then sleep between ops and every op pays a wake-up
    (measured at batch 1 on 2 cores: 47 -> 80 ms per decode step). A thread's pool ends with it.

    Before loading (whose weight packing is the process's first oneDNN call), the native per-shape
    caches are capped: without it RSS climbs ~0.5 GB under mixed prompt lengths (model/native_caches.py).
    """
    log.info("native per-shape caches: %s", cap_primitive_caches())
    built: list[Engine] = []
    failed: list[BaseException] = []

    def body() -> None:
        try:
            built.append(Engine(load(), config, runner_factory))
        except BaseException as exc:  # re-raised in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=body, name="attnserve-load")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return built[0]


@dataclass(frozen=True)
class Backlog:
    """What the engine produced for one reader that the reader has not taken yet."""

    tokens: int
    num_bytes: int  # attention and other inspection payloads


class RequestStream:
    """Async iterator over one request's outputs; ends after the finished one.

    Back-pressure: the engine thread counts what it produces, the reader's loop what it
    takes (one writer each, so no lock); the difference is the backlog the engine checks
    before each step.
    """

    def __init__(self, engine: Engine, request: Request) -> None:
        self.request = request
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        self.produced_tokens = self.produced_bytes = 0  # engine thread
        self.taken_tokens = self.taken_bytes = 0  # the reader's event loop
        self.paused_since: float | None = None  # engine thread

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def backlog(self) -> Backlog:
        return Backlog(self.produced_tokens - self.taken_tokens, self.produced_bytes - self.taken_bytes)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self._queue.get()
                self.taken_tokens += len(out.token_ids)
                self.taken_bytes += out.num_attention_bytes
                if self.paused_since is not None:
                    self._engine.wake()  # it may catch up: let the engine look again
                self.finished = out.finished
                yield out
        finally:
            if not self.finished:  # the reader went away (cancelled, disconnected): stop the work
                # gRPC cancels the handler when the client's deadline passes, a hair before our
                # copy of that deadline: count it as a deadline, not a cancel.
                deadline = self.request.deadline
                late = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
                self._engine.abort(self.request_id, FinishReason.DEADLINE if late else FinishReason.ABORT)

    def _put(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)


@dataclass(frozen=True)
class _Entry:
    """An admitted request as the engine thread serves it: where its outputs go and how they are made."""

    loop: asyncio.AbstractEventLoop  # the reader's event loop (outputs are handed over thread-safely)
    stream: RequestStream
    processor: OutputProcessor  # token ids -> text, stop strings


@dataclass(frozen=True)
class _Delivery:
    entry: _Entry
    out: RequestOutput


class Engine:
    def __init__(
        self, loaded: LoadedModel, config: EngineConfig | None = None, runner_factory: RunnerFactory = ModelRunner
    ) -> None:
        config = config or EngineConfig()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.runner = runner_factory(loaded.model, config.cache, batch_invariant=config.batch_invariant)
        capacity = self.runner.num_blocks * config.cache.block_size
        context = loaded.config.max_position_embeddings
        max_model_len = min(config.max_model_len or context, capacity, context)
        sched_config = dataclasses.replace(
            config.scheduler, max_model_len=max_model_len, num_attention_heads=loaded.config.num_heads
        )
        self.config = dataclasses.replace(config, scheduler=sched_config, max_model_len=max_model_len)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.cache.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            cache_salt=f"{loaded.source}|{loaded.config.architecture}|{loaded.model.dtype}".encode(),
            sliding_window=_common_window(loaded.config) if config.cache.release_out_of_window_blocks else None,
        )
        graph_decode = config.graph_decode if config.graph_decode is not None else self.runner.device.type == "cuda"
        if graph_decode:
            self.runner.use_graph_decode(max_num_seqs=sched_config.max_num_seqs, max_model_len=max_model_len)
        self.scheduler = Scheduler(sched_config, self.block_manager)
        # Constraints: the service compiles (off the event loop), the runner masks and advances.
        self.grammars = GrammarCompiler(self.tokenizer, max(loaded.config.vocab_size, self.tokenizer.vocab_size))
        self.runner.constraints = ConstraintRows(self.grammars)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._aborts: deque[tuple[str, FinishReason]] = deque()
        self._streams: dict[str, _Entry] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.step_observers: list[Callable[[StepStats], None]] = []
        self.output_observers: list[Callable[[Request, RequestOutput], None]] = []
        self.last_progress = time.monotonic()
        self.batch_invariant, self.determinism = _check_determinism(self.runner, enabled=config.batch_invariant)
        if config.batch_invariant and not self.batch_invariant:
            log.warning("not batch-invariant: %s", self.determinism)

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    def info(self) -> EngineInfo:
        c, runner = self.loaded.config, self.runner
        sched = self.config.scheduler
        names = self.config.served_model_names or (c.name, *c.aliases)
        return EngineInfo(
            model_name=names[0],
            model_aliases=tuple(names[1:]),
            architecture=c.architecture,
            context_length=self.max_model_len,
            vocab_size=c.vocab_size,
            max_token_chars=self.tokenizer.max_token_chars,
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            hidden_size=c.hidden_size,
            dtype=str(runner.model.dtype).removeprefix("torch."),
            device=str(runner.device),
            kv_cache_blocks=runner.num_blocks,
            kv_cache_block_size=runner.block_size,
            kv_cache_bytes=runner.kv_cache.num_bytes,
            max_num_seqs=sched.max_num_seqs,
            max_num_waiting=sched.max_num_waiting,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_stream_backlog_bytes=self.config.stream.max_backlog_bytes,
            layer_windows=tuple(c.layer_window(i) or 0 for i in range(c.num_layers)),
            batch_invariant=self.batch_invariant,
            determinism=self.determinism,
            tensor_parallel_size=runner.model.tp.size,
            generation_defaults=dict(self.loaded.generation_defaults),
        )

    def stats(self) -> EngineStats:
        """Read without the lock: each field is one atomic read (a scrape may see two steps' values)."""
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.block_manager.usage,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_paused=self.scheduler.num_paused,
            stream_backlog_bytes=sum(entry.stream.backlog.num_bytes for entry in list(self._streams.values())),
        )

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="attnserve-engine", daemon=True)
            self._thread.start()
        return self

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (EngineStoppedError); in-flight ones go on."""
        self._accepting = False

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to ``timeout`` s, abort the rest."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.has_work and time.monotonic() < deadline and self.is_alive:
            time.sleep(0.01)
        with self._lock:
            for request_id in list(self.scheduler.requests):
                self._aborts.append((request_id, FinishReason.SHUTDOWN))
        self._wakeup.set()
        while self.has_work and self.is_alive and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.runner.constraints is not None:
            self.runner.constraints.close()
        self.runner.close()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._aborts)

    # ------------------------------------------------------------------ intake
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
        priority: int = 0,
        shares_prompt_with: str | None = None,
    ) -> RequestStream:
        """Queue a request; call from a running event loop. Raises QueueFullError, ValueError, EngineStoppedError.

        ``shares_prompt_with`` names a request with the same prompt (another of n completions):
        this one waits for it to compute the prompt and then reuses its blocks.
        """
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        # A guard, not validation (the doors check requests): one bad id would fail the whole step.
        vocab = self.loaded.config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        now = time.monotonic()
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            arrival_time=now,
            eos_token_ids=self.tokenizer.eos_token_ids,
            deadline=None if timeout_s is None else now + timeout_s,
            priority=priority,
            shares_prompt_with=shares_prompt_with,
        )
        stream = RequestStream(self, request)
        with self._lock:
            self.scheduler.add_request(request)
            self._streams[request.request_id] = _Entry(loop, stream, OutputProcessor(self.tokenizer, request))
        self._wakeup.set()
        return stream

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Finish a request at the start of the next step (safe from any thread)."""
        self._aborts.append((request_id, reason))
        self._wakeup.set()

    def waiting_room(self) -> int:
        """Requests the waiting queue still takes: a door can refuse before doing any work."""
        return self.config.scheduler.max_num_waiting - self.scheduler.num_waiting

    def wake(self) -> None:
        self._wakeup.set()

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, **kwargs: object
    ) -> RequestOutput:
        """Run one request to the end; returns the outputs merged into one."""
        stream = self.add_request(prompt_token_ids, params, **kwargs)  # type: ignore[arg-type]
        return merged_output([out async for out in stream])

    # -------------------------------------------------------------------- loop
    def _run(self) -> None:
        while not self._stop:
            # Sleep until woken (a request, an abort, a reader catching up) or for at most 0.5 s
            # (deadlines and stalled readers are checked at each step).
            self._wakeup.wait(timeout=0.5)
            self._wakeup.clear()  # a wake-up during the steps below is kept for the next wait
            try:
                while not self._stop and self.step():
                    pass
            except Exception:  # a bug: fail the requests of that step, keep serving the rest
                log.exception("engine step failed")

    def step(self) -> bool:
        """One schedule -> execute -> update; False if nothing was scheduled."""
        start = time.monotonic()
        plan = self._plan(start)
        result = self._execute(plan)
        if result is None:  # the model step failed: its requests were ended with an error
            return True
        self._deliver(self._update(plan, result))
        self.last_progress = time.monotonic()
        self._observe(plan, self.last_progress - start)
        return not plan.is_empty

    def _plan(self, now: float) -> SchedulerOutput:
        """Pending aborts and back-pressure applied, then the next plan (under the lock: doors add requests)."""
        with self._lock:
            while self._aborts:
                request_id, reason = self._aborts.popleft()
                self.scheduler.abort(request_id, reason)
            self._apply_back_pressure(now)
            return self.scheduler.schedule()

    def _execute(self, plan: SchedulerOutput) -> RunnerOutput | None:
        if plan.is_empty:
            return RunnerOutput()
        try:
            return self.runner.execute(plan)
        except Exception as exc:
            log.exception("model step failed; failing its %d requests", len(plan.requests))
            self._fail(plan, exc)
            return None

    def _update(self, plan: SchedulerOutput, result: RunnerOutput) -> list[_Delivery]:
        with self._lock:
            deltas = self.scheduler.update(plan, result)
            return [delivery for delta in deltas if (delivery := self._output(delta)) is not None]

    def _observe(self, plan: SchedulerOutput, duration_s: float) -> None:
        if plan.is_empty or not self.step_observers:
            return
        stats = self._step_stats(plan, duration_s)
        for observe in self.step_observers:
            observe(stats)

    def _step_stats(self, plan: SchedulerOutput, duration_s: float) -> StepStats:
        bm = self.block_manager
        return StepStats(
            num_batched_tokens=plan.num_batched_tokens,
            num_requests=len(plan.requests),
            duration_s=duration_s,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=bm.usage,
            num_preempted=len(plan.preempted_ids),
            prefix_queries=bm.num_prefix_queries,
            prefix_hits=bm.num_prefix_hits,
        )

    def _apply_back_pressure(self, now: float) -> None:
        """Hold back running requests whose reader is behind; end those held back too long."""
        limits = self.config.stream
        for request in self.scheduler.running:
            entry = self._streams.get(request.request_id)
            if entry is None:
                continue
            stream, backlog = entry.stream, entry.stream.backlog
            if backlog.tokens < limits.max_backlog_tokens and backlog.num_bytes < limits.max_backlog_bytes:
                stream.paused_since = None
                self.scheduler.resume(request.request_id)
                continue
            if stream.paused_since is None:
                stream.paused_since = now
                self.scheduler.pause(request.request_id)
            elif now - stream.paused_since > limits.stalled_timeout_s:
                log.warning(
                    "request %s: its reader took nothing for %.0fs (%d tokens, %d attention bytes waiting); ending it",
                    request.request_id,
                    now - stream.paused_since,
                    backlog.tokens,
                    backlog.num_bytes,
                )
                self.scheduler.abort(request.request_id, FinishReason.STALLED)

    def _output(self, delta: RequestDelta) -> _Delivery | None:
        entry = self._streams.get(delta.request_id)
        if entry is None:
            return None
        out = entry.processor.process(delta)
        entry.stream.produced_tokens += len(out.token_ids)
        entry.stream.produced_bytes += out.num_attention_bytes
        request = entry.processor.request
        if out.finish_reason is not None:
            if not request.is_finished:  # a stop string ended it
                self.scheduler.finish(request.request_id, out.finish_reason)
            out.usage = Usage(request.num_prompt_tokens, len(request.output_token_ids), request.num_cached_tokens)
            out.timings = _timings(request)
            del self._streams[delta.request_id]
        for observe in self.output_observers:
            observe(request, out)
        return _Delivery(entry, out)

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        for delivery in deliveries:
            by_loop.setdefault(delivery.entry.loop, []).append(delivery)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its readers are gone
                loop.call_soon_threadsafe(_put_all, items)  # one wake-up of the loop per step

    def _fail(self, plan: SchedulerOutput, exc: Exception) -> None:
        with self._lock:
            for item in plan.requests:
                self.scheduler.abort(item.request_id, FinishReason.ERROR)
            deltas = self.scheduler.update(SchedulerOutput(), RunnerOutput())
            deliveries = [delivery for delta in deltas if (delivery := self._output(delta)) is not None]
            for delivery in deliveries:
                delivery.out.error = f"{type(exc).__name__}: {exc}"
        self._deliver(deliveries)


def _common_window(config: ModelConfig) -> int | None:
    """The window every layer keeps (the widest, were they to differ), or None where a layer sees
    the whole context: only then may a request's blocks behind the window be given back."""
    windows = [config.layer_window(i) for i in range(config.num_layers)]
    return None if None in windows else max(w for w in windows if w is not None)


def _put_all(deliveries: list[_Delivery]) -> None:
    for delivery in deliveries:
        delivery.entry.stream._put(delivery.out)


def _timings(request: Request) -> Timings:
    arrival, finish = request.arrival_time, request.finish_time or time.monotonic()
    scheduled, first = request.first_scheduled_time, request.first_token_time
    return Timings(
        queue_s=(scheduled or finish) - arrival,
        ttft_s=None if first is None else first - arrival,
        total_s=finish - arrival,
        prefill_s=None if first is None or scheduled is None else first - scheduled,
        decode_s=None if first is None else finish - first,
    )


def _check_determinism(runner: ModelRunner, *, enabled: bool) -> tuple[bool, str]:
    """Whether this engine is batch-invariant, and why, in words (GetServerInfo, /v1/models)."""
    if not enabled:
        return False, "off (--batch-invariant off): prefill attention follows each chunk's shape"
    if runner.device.type != "cpu":
        return False, f"{runner.device.type}: the GPU kernels choose their reduction order by batch shape"
    failures = linear_row_invariance_failures(runner.model)
    if failures:
        return False, "on this CPU a linear's rows change with the batch size: " + "; ".join(failures)
    return True, (
        f"cpu: every attention row reduced in one order over its own positions (K/V {runner.kv_dtype}), "
        "linears checked row-invariant at start-up"
    )
