"""Iteration-level scheduling: which tokens of which requests run in the next step.

Plain Python, data in and data out:

    plan = scheduler.schedule()                    # SchedulerOutput
    out = runner.execute(plan)                     # RunnerOutput (sampled tokens, ...)
    deltas = scheduler.update(plan, out)           # list[RequestDelta]

Every request has ``num_computed_tokens`` (K/V already in the cache) and
``num_tokens`` (prompt + generated). A step gives each request some new tokens
to compute under a token budget and a sequence cap. Decode (one new token),
chunked prefill (part of a prompt) and recompute after preemption are the same
code path. Running requests go first, then waiting ones in arrival order (FCFS).
When blocks run out, the newest running request is preempted: its blocks are
freed and it waits at the head of the queue to recompute.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from attnserve.server.engine.block_manager import BlockManager
from attnserve.server.engine.config import SchedulerConfig
from attnserve.server.engine.errors import DuplicateRequestError, QueueFullError
from attnserve.server.engine.records import RequestDelta, RunnerOutput, ScheduledRequest, SchedulerOutput
from attnserve.server.engine.request import FINISHED_STATUS, FinishReason, Request, RequestStatus


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_outside_step: list[RequestDelta] = []

    # ----------------------------------------------------------------- intake
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise DuplicateRequestError(f"request_id: {request.request_id!r} is already in use by a request in flight")
        if len(self.waiting) >= self.config.max_num_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_num_waiting} requests); retry later")
        if request.num_prompt_tokens >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens; the limit is {self.config.max_model_len - 1}"
            )
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        """Finish a request now (abort, deadline); its delta comes with the next update. False if unknown."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        self._finish(request, reason)
        self._finished_outside_step.append(RequestDelta(request_id, finish_reason=reason))
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._finished_outside_step)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        for request in [*self.running, *self.waiting]:
            if request.deadline is not None and now >= request.deadline:
                self.abort(request.request_id, FinishReason.DEADLINE)

        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()

        # 1. Running requests keep going; preempt the newest when blocks run out.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(request, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            self._add(out, request, num_new)
            scheduled.add(request.request_id)
            budget -= num_new
            index += 1

        # 2. Admit waiting requests in order, unless this step had to preempt.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted_ids:
            request = self.waiting[0]
            # A request that wants the prompt's attention rows must compute every prompt position.
            wants_prompt_rows = request.params.attention is not None and request.params.attention.include_prompt
            if request.num_computed_tokens == 0 and not request.block_table and not wants_prompt_rows:
                cached = self.block_manager.match_prefix(request)
                request.num_computed_tokens = cached
                if request.num_preemptions == 0:
                    request.num_cached_tokens = cached
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.block_manager.allocate_slots(request, num_new):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
            self.running.append(request)
            self._add(out, request, num_new)
            budget -= num_new
        return out

    def _add(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        start = request.num_computed_tokens
        is_sampling = start + num_new == request.num_tokens
        needs_history = request.params.repetition_penalty != 1.0 and is_sampling
        out.requests.append(
            ScheduledRequest(
                request_id=request.request_id,
                token_ids=request.token_slice(start, start + num_new),
                num_computed_tokens=start,
                block_table=list(request.block_table),
                params=request.params,
                num_output_tokens=len(request.output_token_ids),
                is_sampling=is_sampling,
                all_token_ids=request.all_token_ids if needs_history else None,
            )
        )
        out.num_batched_tokens += num_new

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ----------------------------------------------------------------- update
    def update(self, plan: SchedulerOutput, result: RunnerOutput) -> list[RequestDelta]:
        deltas, self._finished_outside_step = self._finished_outside_step, []
        now = self.clock()
        for item in plan.requests:
            request = self.requests.get(item.request_id)
            if request is None or request.is_finished or request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += len(item.token_ids)
            self.block_manager.cache_full_blocks(request)
            attention = result.attention.get(item.request_id, [])
            if not item.is_sampling:
                if attention:
                    deltas.append(RequestDelta(item.request_id, attention=attention))
                continue
            token = result.sampled_token_ids[item.request_id]
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            delta = RequestDelta(item.request_id, [token], attention=attention)
            if item.request_id in result.logprobs:
                delta.logprobs.append(result.logprobs[item.request_id])
            reason = self._stop_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
                delta.finish_reason = reason
            deltas.append(delta)
        return deltas

    def finish(self, request_id: str, reason: FinishReason) -> None:
        """Finish a request found done outside the scheduler (a stop string); no extra delta."""
        request = self.requests.get(request_id)
        if request is not None and not request.is_finished:
            self._finish(request, reason)

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        if token in request.stop_token_ids():
            return FinishReason.STOP
        if len(request.output_token_ids) >= request.params.max_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = FINISHED_STATUS[reason]
        request.finish_reason = reason
        request.finish_time = self.clock()
        del self.requests[request.request_id]
