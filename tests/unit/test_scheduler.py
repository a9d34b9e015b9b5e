"""Scheduler: budget, chunked prefill, preemption, abort, prefix sharing, queue bound. No torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attnserve.server.engine.block_manager import BlockManager
from attnserve.server.engine.config import SchedulerConfig
from attnserve.server.engine.errors import QueueFullError
from attnserve.server.engine.records import RunnerOutput, SchedulerOutput
from attnserve.server.engine.request import AttentionOptions, FinishReason, Request, RequestStatus, SamplingParams
from attnserve.server.engine.scheduler import Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 32,
    max_seqs: int = 8,
    max_waiting: int = 16,
    prefix_caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_num_waiting=max_waiting, max_model_len=256
    )
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(config, bm, clock=FakeClock())


def add(s: Scheduler, rid: str, n: int, max_tokens: int = 100, priority: int = 0, **kw: object) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **kw)  # type: ignore[arg-type]
    r = Request(rid, [10 + i for i in range(n)], params, 0.0, eos_token_ids=(2,), priority=priority)
    s.add_request(r)
    return r


def run(s: Scheduler, plan: SchedulerOutput, token: int = 7):
    """A hand-made runner: every sampling request gets `token`."""
    return s.update(plan, RunnerOutput({i.request_id: token for i in plan.requests if i.is_sampling}))


def test_plain_python() -> None:
    code = (
        "import sys, attnserve.server.engine.scheduler, attnserve.server.engine.block_manager, "
        "attnserve.server.engine.records; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_admission_under_token_budget() -> None:
    s = make(budget=20)
    for rid in "abc":
        add(s, rid, 8)
    plan = s.schedule()
    # a and b fit whole (16 tokens); c gets the remaining 4 as a chunk.
    assert [(i.request_id, len(i.token_ids)) for i in plan.requests] == [("a", 8), ("b", 8), ("c", 4)]
    assert plan.num_batched_tokens == 20
    assert [i.is_sampling for i in plan.requests] == [True, True, False]


def test_sequence_cap() -> None:
    s = make(max_seqs=2)
    for rid in "abc":
        add(s, rid, 4)
    plan = s.schedule()
    assert [i.request_id for i in plan.requests] == ["a", "b"]
    assert s.num_waiting == 1


def test_chunked_prefill_progresses_then_decodes_alongside_others() -> None:
    s = make(budget=10)
    long = add(s, "long", 25)
    progress = []
    for _ in range(3):
        plan = s.schedule()
        assert plan.num_batched_tokens <= 10
        progress.append([(i.request_id, i.num_computed_tokens, len(i.token_ids)) for i in plan.requests])
        run(s, plan)
    assert progress == [[("long", 0, 10)], [("long", 10, 10)], [("long", 20, 5)]]
    assert long.output_token_ids == [7]
    add(s, "short", 3)
    plan = s.schedule()  # decode of `long` and prefill of `short` in one step
    assert [(i.request_id, len(i.token_ids)) for i in plan.requests] == [("long", 1), ("short", 3)]
    assert plan.requests[0].token_ids == [7] and plan.requests[0].num_computed_tokens == 25


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_and_resume_by_recompute(prefix_caching: bool) -> None:
    # 5 blocks of 4: two requests of 8 prompt tokens hold 4 blocks; their 9th tokens need 2 more.
    s = make(num_blocks=5, block_size=4, budget=64, prefix_caching=prefix_caching)
    add(s, "a", 8)
    b = add(s, "b", 8)
    run(s, s.schedule())  # both prefilled, one token generated each
    plan = s.schedule()
    assert plan.preempted_ids == ["b"], "the newest running request is preempted"
    assert b.status is RequestStatus.PREEMPTED and b.block_table == [] and b.num_computed_tokens == 0
    assert [i.request_id for i in plan.requests] == ["a"]
    assert s.waiting[0] is b
    run(s, plan)
    # a runs on; b resumes when a finishes and recomputes prompt + its generated token.
    s.abort("a")
    run(s, SchedulerOutput())
    plan = s.schedule()
    item = plan.requests[0]
    assert item.request_id == "b" and item.is_sampling
    if prefix_caching:  # its own full prompt blocks were still cached: only the tail is recomputed
        assert item.num_computed_tokens == 8 and item.token_ids == [7]
    else:
        assert item.num_computed_tokens == 0 and item.token_ids == [*b.prompt_token_ids, 7]
    assert item.num_output_tokens == 1  # the seeded sampler continues at step 1
    run(s, plan)
    assert b.output_token_ids == [7, 7] and b.num_preemptions == 1 and s.num_preemptions == 1


def test_preempted_request_never_dropped_under_pressure() -> None:
    s = make(num_blocks=8, block_size=2, budget=64, max_seqs=8)
    reqs = [add(s, f"r{i}", 3, max_tokens=6) for i in range(5)]
    for _ in range(200):
        if not s.has_work:
            break
        run(s, s.schedule())
    assert all(r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 6 for r in reqs)
    assert s.num_preemptions > 0
    assert s.block_manager.num_free_blocks == 8


def test_abort_frees_blocks_and_reports() -> None:
    s = make()
    r = add(s, "a", 10)
    run(s, s.schedule())
    assert r.block_table
    assert s.abort("a")
    assert s.block_manager.num_free_blocks == 64 and r.status is RequestStatus.FINISHED_ABORTED
    deltas = s.update(SchedulerOutput(), RunnerOutput())
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("a", FinishReason.ABORT)]
    assert not s.abort("a") and not s.abort("unknown")


def test_abort_while_step_in_flight_is_ignored_by_update() -> None:
    s = make()
    add(s, "a", 4)
    plan = s.schedule()
    s.abort("a")
    deltas = run(s, plan)
    assert [d.finish_reason for d in deltas] == [FinishReason.ABORT]
    assert s.block_manager.num_free_blocks == 64


def test_deadline_finishes_waiting_and_running() -> None:
    s = make(max_seqs=1)
    a = add(s, "a", 4)
    a.deadline = 5.0
    b = add(s, "b", 4)
    b.deadline = 5.0
    run(s, s.schedule())
    s.clock.now = 6.0
    plan = s.schedule()
    assert plan.is_empty
    deltas = s.update(plan, RunnerOutput())
    assert {d.request_id: d.finish_reason for d in deltas} == {"a": FinishReason.DEADLINE, "b": FinishReason.DEADLINE}
    assert s.block_manager.num_free_blocks == 64


def test_prefix_cache_hit_skips_computed_blocks() -> None:
    s = make(block_size=4)
    add(s, "a", 10)
    run(s, s.schedule())
    b = Request("b", [10 + i for i in range(10)] + [99], SamplingParams(), 0.0)
    s.add_request(b)
    plan = s.schedule()
    item = next(i for i in plan.requests if i.request_id == "b")
    assert item.num_computed_tokens == 8 and item.token_ids == [18, 19, 99]
    assert b.num_cached_tokens == 8
    a = s.requests["a"]
    assert b.block_table[:2] == a.block_table[:2]


def test_waiting_queue_bound() -> None:
    s = make(max_waiting=2)
    add(s, "a", 4)
    add(s, "b", 4)
    with pytest.raises(QueueFullError, match="full"):
        add(s, "c", 4)
    run(s, s.schedule())  # a and b admitted: room again
    add(s, "c", 4)


def test_stop_conditions() -> None:
    s = make()
    eos = add(s, "eos", 3)
    ignore = add(s, "ignore", 3, max_tokens=2, ignore_eos=True)
    stop_id = add(s, "stop_id", 3, stop_token_ids=(7,))
    deltas = {d.request_id: d for d in s.update(s.schedule(), RunnerOutput({"eos": 2, "ignore": 2, "stop_id": 7}))}
    assert deltas["eos"].finish_reason is FinishReason.STOP and eos.is_finished
    assert deltas["ignore"].finish_reason is None and not ignore.is_finished
    assert deltas["stop_id"].finish_reason is FinishReason.STOP and stop_id.is_finished
    deltas = {d.request_id: d for d in s.update(s.schedule(), RunnerOutput({"ignore": 2}))}
    assert deltas["ignore"].finish_reason is FinishReason.LENGTH


def test_model_length_limit() -> None:
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_num_waiting=4, max_model_len=6)
    s = Scheduler(config, BlockManager(16, 4), clock=FakeClock())
    with pytest.raises(ValueError, match="limit is 5"):
        s.add_request(Request("x", list(range(6)), SamplingParams(), 0.0))
    r = Request("y", list(range(4)), SamplingParams(max_tokens=100), 0.0)
    s.add_request(r)
    reasons = [d.finish_reason for _ in range(3) for d in run(s, s.schedule())]
    assert reasons == [None, FinishReason.LENGTH] and r.num_tokens == 6


def test_duplicate_request_id_rejected() -> None:
    s = make()
    add(s, "a", 3)
    with pytest.raises(ValueError, match="already in use"):
        add(s, "a", 3)


def test_priority_orders_admission_and_fcfs_within_a_priority() -> None:
    s = make(max_seqs=2)
    add(s, "low", 4, priority=5)
    add(s, "first", 4)
    add(s, "second", 4)
    plan = s.schedule()
    assert [i.request_id for i in plan.requests] == ["first", "second"]
    assert [r.request_id for r in s.waiting] == ["low"]


def test_a_better_priority_preempts_the_worst_running_request_when_there_is_no_room() -> None:
    s = make(max_seqs=2)
    add(s, "a", 4, priority=1)
    b = add(s, "b", 4, priority=2)
    run(s, s.schedule())
    add(s, "urgent", 4, priority=0)
    plan = s.schedule()
    assert plan.preempted_ids == ["b"] and b.status is RequestStatus.PREEMPTED
    assert sorted(i.request_id for i in plan.requests) == ["a", "urgent"]
    add(s, "equal", 4, priority=1)  # not better than the worst running one (a, 1): waits its turn
    plan = s.schedule()
    assert not plan.preempted_ids and "equal" not in [i.request_id for i in plan.requests]


def test_paused_request_keeps_its_blocks_and_gets_no_tokens() -> None:
    s = make()
    a = add(s, "a", 4)
    add(s, "b", 4)
    run(s, s.schedule())
    s.pause("a")
    blocks = list(a.block_table)
    for _ in range(3):
        plan = s.schedule()
        assert [i.request_id for i in plan.requests] == ["b"]
        run(s, plan)
    assert a.block_table == blocks and a.num_computed_tokens == 4 and a.output_token_ids == [7]
    s.resume("a")
    assert "a" in [i.request_id for i in s.schedule().requests]


def test_a_sibling_waits_for_the_shared_prompt_then_reuses_its_blocks() -> None:
    s = make(block_size=4, budget=8)
    prompt = [10 + i for i in range(13)]
    first = Request("x#0", prompt, SamplingParams(max_tokens=4), 0.0)
    second = Request("x#1", prompt, SamplingParams(max_tokens=4), 0.0, shares_prompt_with="x#0")
    s.add_request(first)
    s.add_request(second)
    add(s, "other", 2)
    plan = s.schedule()  # the sibling waits; the request behind it is not held up
    assert [i.request_id for i in plan.requests] == ["x#0"]
    run(s, plan)
    plan = s.schedule()
    assert [i.request_id for i in plan.requests] == ["x#0", "other"]
    run(s, plan)
    plan = s.schedule()  # x#0 has computed its prompt: the sibling starts from the cached blocks
    item = next(i for i in plan.requests if i.request_id == "x#1")
    assert item.num_computed_tokens == 12 and second.num_cached_tokens == 12


def test_prompt_rows_are_chunked_by_the_attention_budget() -> None:
    config = SchedulerConfig(
        max_num_batched_tokens=512,
        max_num_seqs=4,
        max_num_waiting=4,
        max_model_len=512,
        max_attention_scores_per_step=2 * 3 * 40 * 60,
        num_attention_heads=3,
    )
    s = Scheduler(config, BlockManager(64, 16), clock=FakeClock())
    options = AttentionOptions(layers=(0, 1), include_prompt=True)
    r = Request("rows", list(range(3, 203)), SamplingParams(max_tokens=2, attention=options), 0.0)
    s.add_request(r)
    chunks = []
    while not r.output_token_ids:
        plan = s.schedule()
        item = plan.requests[0]
        chunks.append((item.num_computed_tokens, len(item.token_ids)))
        # n queries over (start + n) keys, 2 layers x 3 heads: within the budget (or one query at least)
        assert (
            len(item.token_ids) == 1 or len(item.token_ids) * item.seq_len * 6 <= config.max_attention_scores_per_step
        )
        run(s, plan)
    assert chunks[0] == (0, 48) and sum(n for _, n in chunks) == 200 and len(chunks) > 4  # 48 * 48 <= 2400


def test_prompt_rows_are_reported_once_even_after_preemption() -> None:
    s = make(block_size=4, budget=8)
    r = add(s, "a", 12, attention=AttentionOptions(layers=(0,), include_prompt=True))
    plan = s.schedule()
    assert plan.requests[0].report_prompt_from == 0 and plan.requests[0].next_token_id == r.prompt_token_ids[8]
    run(s, plan)
    assert r.num_prompt_reported == 8
    s._preempt(r)  # recompute from scratch: positions 0..7 were already reported
    plan = s.schedule()
    assert plan.requests[0].num_computed_tokens == 0 and plan.requests[0].report_prompt_from == 8


def test_constraint_dead_ends_the_request_without_its_token_and_done_stops_it() -> None:
    s = make()
    add(s, "dead", 4)
    add(s, "done", 4)
    add(s, "free", 4)
    plan = s.schedule()
    sampled = {i.request_id: 7 for i in plan.requests if i.is_sampling}
    out = RunnerOutput(
        sampled, constraint_done={"done"}, constraint_dead={"dead": "the constraint allows no next token"}
    )
    deltas = {d.request_id: d for d in s.update(plan, out)}
    assert deltas["dead"].finish_reason is FinishReason.CONSTRAINT and deltas["dead"].new_token_ids == []
    assert deltas["done"].finish_reason is FinishReason.STOP and deltas["done"].new_token_ids == [7]
    assert deltas["free"].finish_reason is None
    assert set(s.requests) == {"free"}


def test_a_windowed_model_gives_back_blocks_behind_the_window_as_requests_move_on() -> None:
    """Every layer windowed (8 positions): two requests generate 120 tokens each in 16-block cache
    (without releasing they would need 2 x 32); the plan tells the runner which entries went."""
    config = SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_num_waiting=4, max_model_len=256)
    s = Scheduler(config, BlockManager(16, 4, sliding_window=8), clock=FakeClock())
    a, b = add(s, "a", 10, max_tokens=120), add(s, "b", 3, max_tokens=120)
    most_held, released_seen = 0, 0
    while s.has_work:
        plan = s.schedule()
        for item in plan.requests:
            assert item.num_released_blocks == s.block_manager.num_released(s.requests[item.request_id])
            released_seen = max(released_seen, item.num_released_blocks)
        run(s, plan)
        most_held = max(most_held, 15 - s.block_manager.num_free_blocks)
    assert s.num_preemptions == 0 and len(a.output_token_ids) == len(b.output_token_ids) == 120
    assert most_held <= 8 and released_seen >= 25, (most_held, released_seen)
    assert s.block_manager.num_free_blocks == 15


def test_a_preempted_windowed_request_comes_back_through_the_prefix_cache_keeping_only_its_window() -> None:
    config = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_num_waiting=4, max_model_len=256)
    s = Scheduler(config, BlockManager(64, 4, sliding_window=4), clock=FakeClock())
    r = add(s, "a", 20, max_tokens=30)
    for _ in range(6):  # the prompt, then five tokens
        run(s, s.schedule())
    assert s.block_manager.num_released(r) == (25 - 4 + 1) // 4
    s._preempt(r)
    assert r.block_table == [] and s.block_manager.num_released(r) == 0
    plan = s.schedule()  # readmitted: its 24 cached tokens are hit, and those behind the window let go again
    assert plan.requests[0].num_computed_tokens == 24
    assert plan.requests[0].num_released_blocks == s.block_manager.num_released(r) == (24 - 4 + 1) // 4
    run(s, plan)
    while s.has_work:
        run(s, s.schedule())
    assert len(r.output_token_ids) == 30 and r.num_preemptions == 1
    assert s.block_manager.num_free_blocks == 63
