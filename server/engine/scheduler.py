"""Iteration-level scheduling: which tokens of which requests run in the next step.

Plain Python, data in and data out:

    plan = scheduler.schedule()                    # SchedulerOutput
    out = runner.execute(plan)                     # RunnerOutput (sampled tokens, ...)
    deltas = scheduler.update(plan, out)           # list[RequestDelta]

Every request has ``num_computed_tokens`` (K/V already in the cache) and
``num_tokens`` (prompt + generated). A step gives each request some new tokens
to compute under a token budget and a sequence cap. Decode (one new token),
chunked prefill (part of a prompt) and recompute after preemption are the same
code path. Running requests go first, then waiting ones, both in (priority,
arrival) order: lower priority values first, first come first served within one.
When blocks run out, the last running request in that order is preempted: its
blocks are freed and it waits to recompute. Where every layer of the model is windowed, a
request's blocks that fell out of the window are released as it computes (BlockManager). A waiting request of a better
priority than a running one preempts it when there is no room for it.

Two kinds of requests are held back without losing their place:
- a paused request (its reader is behind, see Engine) keeps its blocks but gets no
  tokens until it is resumed;
- a request that shares its prompt with a sibling (n > 1) waits until the sibling has
  computed the prompt, then takes the prompt's blocks from the prefix cache.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

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
        self.waiting: list[Request] = []  # in Request.order
        self.running: list[Request] = []  # in Request.order
        self.requests: dict[str, Request] = {}
        self.paused: set[str] = set()  # running requests that get no tokens for now (pause / resume)
        self.num_preemptions = 0
        self._arrivals = 0
        self._finished_since_plan: list[str] = []
        self._finished_outside_step: list[RequestDelta] = []

    # ----------------------------------------------------------------- intake
    def pause(self, request_id: str) -> None:
        """Give this running request no tokens until resumed; it keeps its blocks and its place."""
        self.paused.add(request_id)

    def resume(self, request_id: str) -> None:
        self.paused.discard(request_id)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise DuplicateRequestError(f"request_id: {request.request_id!r} is already in use by a request in flight")
        if self.is_full:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_num_waiting} requests); retry later")
        if request.num_prompt_tokens >= self.config.max_model_len:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens; the limit is {self.config.max_model_len - 1}"
            )
        request.status = RequestStatus.WAITING
        request.arrival_index = self._arrivals
        self._arrivals += 1
        bisect.insort(self.waiting, request, key=_order)
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
    def is_full(self) -> bool:
        """The waiting queue takes no more requests."""
        return len(self.waiting) >= self.config.max_num_waiting

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._finished_outside_step)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_paused(self) -> int:
        return len(self.paused)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        for request in [*self.running, *self.waiting]:
            if request.deadline is not None and now >= request.deadline:
                self.abort(request.request_id, FinishReason.DEADLINE)
        out = SchedulerOutput(finished_ids=self._finished_since_plan)
        self._finished_since_plan = []
        self._preempt_for_priority(out)
        step = _StepBudget(self.config.max_num_batched_tokens, self.config.max_attention_scores_per_step)
        if self._schedule_running(out, step):  # blocks ran out: a step that had to preempt admits nobody
            self._admit_waiting(out, step)
        return out

    def _schedule_running(self, out: SchedulerOutput, step: _StepBudget) -> bool:
        """Running requests keep going in order; the last in order is preempted when blocks run out.
        False if that happened."""
        index, had_room = 0, True
        while index < len(self.running) and step.tokens > 0:
            request = self.running[index]
            index += 1
            if request.request_id in self.paused:
                continue
            num_new = self._chunk(request, step)
            while not self.block_manager.allocate_slots(request, num_new):
                had_room = False
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                return False  # it preempted itself: everything after it is gone too
            self._add(out, request, num_new, step)
        return had_room

    def _admit_waiting(self, out: SchedulerOutput, step: _StepBudget) -> None:
        """Admit waiting requests in order; a request that cannot get blocks stops admission (nobody overtakes)."""
        index = 0
        while index < len(self.waiting) and step.tokens > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[index]
            if self._waits_for_sibling(request):
                index += 1  # its sibling is still computing the shared prompt: let the others pass
                continue
            if request.num_computed_tokens == 0 and not request.block_table:
                self._match_prefix(request)
            num_new = self._chunk(request, step)
            if not self.block_manager.allocate_slots(request, num_new):
                return
            del self.waiting[index]
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
            bisect.insort(self.running, request, key=_order)
            self._add(out, request, num_new, step)

    def _match_prefix(self, request: Request) -> None:
        if request.params.needs_every_prompt_position:
            return  # prompt rows are due for every position: nothing may be skipped
        cached = self.block_manager.match_prefix(request)
        request.num_computed_tokens = cached
        self.block_manager.release_out_of_window(request)  # a long cached prefix: only its window is kept
        if request.num_preemptions == 0:
            request.num_cached_tokens = cached

    def _waits_for_sibling(self, request: Request) -> bool:
        sibling = self.requests.get(request.shares_prompt_with or "")
        return sibling is not None and sibling.num_computed_tokens < sibling.num_prompt_tokens

    def _chunk(self, request: Request, step: _StepBudget) -> int:
        """How many of the request's remaining tokens fit this step's budgets."""
        start = request.num_computed_tokens
        num_new = min(request.num_tokens - start, step.tokens)
        attention = request.params.attention
        if attention is not None and attention.include_prompt and start < request.num_prompt_tokens:
            # Prompt rows of n queries over (start + n) keys cost n * (start + n) scores per layer and head.
            # The largest n with n * (start + n) <= allowed; at least 1, so the request always moves.
            allowed = max(step.attention_scores, 0) // (len(attention.layers) * self.config.num_attention_heads)
            fit = (math.isqrt(start * start + 4 * allowed) - start) // 2
            num_new = max(1, min(num_new, fit))
        return num_new

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        """While the best waiting request outranks the worst running one and has no room, preempt the latter."""
        while self.waiting and self.running:
            head, worst = self.waiting[0], self.running[-1]
            if head.priority >= worst.priority:
                return
            remaining = head.num_tokens - head.num_computed_tokens
            blocks = self.block_manager.blocks_needed(min(remaining, self.config.max_num_batched_tokens))
            if len(self.running) < self.config.max_num_seqs and self.block_manager.num_free_blocks >= blocks:
                return
            self._preempt(worst)
            out.preempted_ids.append(worst.request_id)

    def _add(self, out: SchedulerOutput, request: Request, num_new: int, step: _StepBudget) -> None:
        start = request.num_computed_tokens
        end = start + num_new
        is_sampling = end == request.num_tokens
        needs_history = request.params.repetition_penalty != 1.0 and is_sampling
        reports_prompt = request.params.needs_every_prompt_position and start < request.num_prompt_tokens
        out.requests.append(
            ScheduledRequest(
                request_id=request.request_id,
                token_ids=request.token_slice(start, end),
                num_computed_tokens=start,
                block_table=request.block_table,  # no copy per step: it only grows between steps
                num_released_blocks=self.block_manager.num_released(request),
                params=request.params,
                num_output_tokens=len(request.output_token_ids),
                num_prompt_tokens=request.num_prompt_tokens,
                is_sampling=is_sampling,
                all_token_ids=request.all_token_ids if needs_history else None,
                report_prompt_from=request.num_prompt_reported if reports_prompt else None,
                next_token_id=request.token_slice(end, end + 1)[0] if reports_prompt and not is_sampling else None,
            )
        )
        out.num_batched_tokens += num_new
        step.tokens -= num_new
        attention = request.params.attention
        if reports_prompt and attention is not None and attention.include_prompt:
            step.attention_scores -= num_new * end * len(attention.layers) * self.config.num_attention_heads

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=_order)

    # ----------------------------------------------------------------- update
    def update(self, plan: SchedulerOutput, result: RunnerOutput) -> list[RequestDelta]:
        deltas, self._finished_outside_step = self._finished_outside_step, []
        now = self.clock()
        for item in plan.requests:
            request = self.requests.get(item.request_id)
            if request is None or request.is_finished or request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += len(item.token_ids)
            if item.report_prompt_from is not None:
                request.num_prompt_reported = max(
                    request.num_prompt_reported, min(request.num_computed_tokens, request.num_prompt_tokens)
                )
            self.block_manager.cache_full_blocks(request)
            self.block_manager.release_out_of_window(request)  # after caching: a released block keeps its key
            delta = RequestDelta(
                item.request_id,
                attention=result.attention.get(item.request_id, []),
                prompt_logprobs=result.prompt_logprobs.get(item.request_id, []),
                residuals=result.residuals.get(item.request_id, []),
                lens=result.lens.get(item.request_id, []),
            )
            if item.is_sampling:
                self._append_token(request, result, delta, now)
            if (
                delta.new_token_ids
                or delta.attention
                or delta.prompt_logprobs
                or delta.residuals
                or delta.lens
                or delta.finish_reason
            ):
                deltas.append(delta)
        return deltas

    def _append_token(self, request: Request, result: RunnerOutput, delta: RequestDelta, now: float) -> None:
        if request.request_id in result.constraint_dead:  # the sampled token broke no rule only by luck: drop it
            self._finish(request, FinishReason.CONSTRAINT)
            delta.finish_reason = FinishReason.CONSTRAINT
            return
        token = result.sampled_token_ids[request.request_id]
        request.output_token_ids.append(token)
        if request.first_token_time is None:
            request.first_token_time = now
        delta.new_token_ids.append(token)
        if request.request_id in result.logprobs:
            delta.logprobs.append(result.logprobs[request.request_id])
        reason = self._stop_reason(request, token)
        if reason is None and request.request_id in result.constraint_done:
            reason = FinishReason.STOP  # the grammar is complete: nothing more may follow
        if reason is not None:
            self._finish(request, reason)
            delta.finish_reason = reason

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
        self.paused.discard(request.request_id)
        self.block_manager.free(request)
        request.status = FINISHED_STATUS[reason]
        request.finish_reason = reason
        request.finish_time = self.clock()
        del self.requests[request.request_id]
        self._finished_since_plan.append(request.request_id)


@dataclass
class _StepBudget:
    tokens: int
    attention_scores: int


def _order(request: Request) -> tuple[int, int]:
    return request.order
