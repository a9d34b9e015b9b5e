"""The load generator's statistics and prompt sets (no server needed)."""

from __future__ import annotations

import pytest

from attnserve.client.bench import RequestResult, make_prompts, percentile, summarize


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([10], 99) == 10
    assert percentile([], 50) is None


def test_summary_counts_tokens_latencies_and_goodput() -> None:
    fast = RequestResult(ok=True, output_tokens=5, ttft=0.1, e2e=0.5, itls=[0.1] * 4)
    slow = RequestResult(ok=True, output_tokens=5, ttft=3.0, e2e=4.0, itls=[0.25] * 4)
    asked = RequestResult(ok=True, output_tokens=5, ttft=0.2, e2e=0.6, itls=[0.1] * 4, asked_attention=True)
    failed = RequestResult(ok=False, error="boom")
    s = summarize([fast, slow, asked, failed], duration=2.0, slo_ttft=1.0, slo_tpot=0.2)
    assert s["requests"] == 4 and s["failed"] == 1 and s["first_error"] == "boom"
    assert s["output_tok_s"] == 7.5 and s["request_throughput"] == 1.5
    assert s["tpot_p50_ms"] == pytest.approx(100.0)  # (0.5-0.1)/4, (0.6-0.2)/4, (4-3)/4 -> median 0.1
    assert s["goodput_req_s"] == 1.0  # fast and asked meet both SLOs; slow misses TTFT
    assert s["plain_output_tok_s"] == 5.0  # fast + slow, over 2 s


def test_prompt_sets() -> None:
    fixed = make_prompts(8, 32, 16, "random", seed=1, attention_every=4)
    assert all(len(p.text.split()) == 32 and p.output_len == 16 for p in fixed)
    assert [p.attention for p in fixed] == [True, False, False, False] * 2
    assert make_prompts(8, 32, 16, "random", seed=1) == make_prompts(8, 32, 16, "random", seed=1)
    mixed = make_prompts(40, 32, 16, "mixed", seed=2)
    assert len({len(p.text.split()) for p in mixed}) > 1 and len({p.output_len for p in mixed}) > 1
