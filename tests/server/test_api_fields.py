"""The API fields users expect next, through the real gRPC server: n, prompt logprobs, priority,
Abort and GetServerInfo."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from attnserve.client import (
    AbortedError,
    AttnserveError,
    Client,
    InvalidArgumentError,
    NotFoundError,
    row_positions,
    row_weights,
)
from attnserve.model.attention import AttentionMetadata
from attnserve.model.loader import load_model
from tests.helpers import new_cache, scattered_block_tables
from tests.server.server_process import ServerProcess

pytestmark = pytest.mark.slow  # real server processes
GREEDY = dict(temperature=0.0)


def test_greedy_n_2_gives_two_identical_completions(client: Client) -> None:
    reply = client.generate("two of them", n=2, max_tokens=12, ignore_eos=True, **GREEDY)
    first, second = reply.completions
    assert (first.index, second.index) == (0, 1)
    assert list(first.token_ids) == list(second.token_ids) and first.text == second.text
    assert reply.usage.completion_tokens == 24 and reply.usage.prompt_tokens == len("two of them")


def test_seeded_n_completions_differ_from_each_other_and_reproduce(client: Client) -> None:
    ask = dict(n=3, max_tokens=16, ignore_eos=True, temperature=1.0, seed=1234)
    a = [list(c.token_ids) for c in client.generate("seeded n", **ask).completions]
    b = [list(c.token_ids) for c in client.generate("seeded n", **ask).completions]
    assert a == b
    assert len({tuple(tokens) for tokens in a}) == 3
    alone = client.generate("seeded n", max_tokens=16, ignore_eos=True, temperature=1.0, seed=1234)
    assert list(alone.completions[0].token_ids) == a[0]  # completion 0 is the request as asked


def test_n_completions_stream_with_their_index_and_share_the_prompt_blocks(client: Client) -> None:
    prompt = [11 + i % 300 for i in range(70)]  # four full blocks of 16 to share
    messages = list(client.generate_stream(token_ids=prompt, n=3, max_tokens=5, ignore_eos=True, **GREEDY))
    per_index = {i: [t for m in messages if m.index == i for t in m.token_ids] for i in range(3)}
    assert all(len(tokens) == 5 for tokens in per_index.values())
    assert sum(1 for m in messages if m.finish_reason) == 3
    last = messages[-1]
    assert last.usage.completion_tokens == 15 and last.usage.cached_tokens == 64


def test_prompt_logprobs_score_every_prompt_token_after_the_first(client: Client) -> None:
    prompt = [5, 77, 120, 33, 250, 9, 64, 101, 17, 3, 200, 45, 12, 6, 99, 150, 2, 80, 81, 82]
    reply = client.generate(token_ids=prompt, max_tokens=1, prompt_logprobs=2, **GREEDY)
    scored = reply.prompt_logprobs
    assert [lp.token_id for lp in scored] == prompt[1:]
    loaded = load_model("dummy:tiny", dtype=torch.float32)  # the server's weights (same seed)
    tables = scattered_block_tables([len(prompt)], 16)
    meta = AttentionMetadata.build(block_tables=tables, seq_lens=[len(prompt)], query_lens=[len(prompt)], block_size=16)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor(prompt), meta.positions, new_cache(loaded.model, tables, 16), meta)
    expected = logits.log_softmax(-1)
    for position, lp in enumerate(scored, start=1):
        assert math.isclose(lp.logprob, expected[position - 1, prompt[position]].item(), abs_tol=1e-4)
        assert len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob
        assert lp.top[0].token_id == expected[position - 1].argmax().item()
    streamed = [
        lp
        for m in client.generate_stream(token_ids=prompt, max_tokens=1, prompt_logprobs=0)
        for lp in m.prompt_logprobs
    ]
    assert [lp.token_id for lp in streamed] == prompt[1:]


def test_abort_ends_a_request_in_flight_with_aborted(client: Client, tiny_server: ServerProcess) -> None:
    stream = client.generate_stream("abort me", request_id="abort-me", max_tokens=900, ignore_eos=True)
    next(stream)
    # Another connection (channels in one process share one unless told not to): not its request.
    other = Client(tiny_server.target, timeout=30, options=[("grpc.use_local_subchannel_pool", 1)])
    with other, pytest.raises(NotFoundError, match="abort-me"):
        other.abort("abort-me")
    with pytest.raises(NotFoundError, match="no-such-request"):
        client.abort("no-such-request")
    client.abort("abort-me")
    with pytest.raises(AbortedError, match="Abort"):
        for _ in stream:
            pass
    deadline = time.monotonic() + 5
    while tiny_server.metric("attnserve_num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tiny_server.metric("attnserve_kv_cache_usage_perc") == 0


def test_a_request_id_in_flight_is_not_taken_twice_and_stays_abortable(client: Client) -> None:
    stream = client.generate_stream("first", request_id="twice", max_tokens=900, ignore_eos=True)
    next(stream)
    with pytest.raises(AttnserveError) as caught:
        client.generate("second", request_id="twice", max_tokens=2)
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    client.abort("twice")  # the first one's entry survived the refusal
    with pytest.raises(AbortedError):
        for _ in stream:
            pass


def test_server_info_reports_version_limits_load_and_capacity(client: Client) -> None:
    info = client.server_info()
    assert info.version and info.model == "tiny"
    assert info.limits.context_length == 1024 and info.limits.max_num_waiting == 64
    assert info.limits.max_attention_bytes_per_request == 4 << 20 and info.limits.max_request_bytes == 4 << 20
    assert info.kv_cache_blocks > 0 and info.kv_cache_bytes == 64 << 20 and info.kv_cache_block_size == 16
    assert info.default_sampling.temperature == 0.0 and info.default_sampling.max_tokens == 256
    assert info.load.kv_cache_free_blocks == info.kv_cache_blocks - round(
        info.load.kv_cache_usage * info.kv_cache_blocks
    )
    # The default CPU path, and the start-up check of the linears passed on this machine.
    assert info.batch_invariant, info.determinism
    assert "checked row-invariant at start-up" in info.determinism


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "16MiB", "--max-num-seqs", "1"]
    server = ServerProcess(args).start(tmp_path_factory.mktemp("priority") / "server.log")
    try:
        yield server.wait_serving()
    finally:
        server.stop()


def test_priority_runs_first_and_preempts_a_worse_one(one_at_a_time: ServerProcess) -> None:
    finished: list[str] = []
    lock = threading.Lock()

    def run(name: str, priority: int, max_tokens: int) -> None:
        with Client(one_at_a_time.target, timeout=120) as c:
            c.generate(name, max_tokens=max_tokens, ignore_eos=True, priority=priority, **GREEDY)
        with lock:
            finished.append(name)

    first = threading.Thread(target=run, args=("background", 5, 800))
    first.start()
    time.sleep(0.3)  # it runs alone (one sequence at a time)
    waiting = [threading.Thread(target=run, args=(f"normal-{i}", 0, 300)) for i in range(2)]
    for t in waiting:
        t.start()
        time.sleep(0.05)
    urgent = threading.Thread(target=run, args=("urgent", -1, 20))
    urgent.start()
    for t in [first, *waiting, urgent]:
        t.join(120)
    # normal-0 preempted the background request on arrival, urgent preempted normal-0 (FCFS within a priority).
    assert finished == ["urgent", "normal-0", "normal-1", "background"], finished
    assert one_at_a_time.metric("attnserve_num_preemptions_total") >= 2


def test_top_k_attention_rows_are_the_top_k_of_the_full_rows(client: Client) -> None:
    """Same greedy request twice: whole rows, then top-3 rows; each top-k row holds the 3 largest
    weights of its full row (per head), largest first, with their key positions."""
    ask = dict(token_ids=list(range(5, 25)), max_tokens=4, ignore_eos=True, temperature=0.0, include_prompt=True)
    full = client.generate(**ask, attention_layers=[0, 1], head_reduction="none", attention_dtype="float32")
    top = client.generate(
        **ask, attention_layers=[0, 1], head_reduction="none", attention_dtype="float32", attention_top_k=3
    )
    full_rows = {(r.layer, r.position): row_weights(r) for r in full.completions[0].attention}
    top_rows = list(top.completions[0].attention)
    assert len(top_rows) == len(full_rows) and full.completions[0].token_ids == top.completions[0].token_ids
    for row in top_rows:
        weights, positions = row_weights(row), row_positions(row)
        assert row.num_kept == min(3, row.context_len) and len(row.weights) == row.num_heads * row.num_kept * 4
        for head, (kept, keys) in enumerate(zip(weights, positions, strict=True)):
            whole = full_rows[(row.layer, row.position)][head]
            assert kept == sorted(kept, reverse=True)
            assert [whole[k] for k in keys] == kept
            assert kept == sorted(whole, reverse=True)[: row.num_kept]


def test_top_k_past_the_context_is_refused(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match=r"attention\.top_k"):
        client.generate("hi", max_tokens=2, attention_layers=[0], attention_top_k=10**6)


def test_span_sums_are_the_sums_of_the_full_rows(client: Client) -> None:
    """How much each part of a prompt was read: each row's weight on each span, per head."""
    ask = dict(token_ids=list(range(5, 25)), max_tokens=3, ignore_eos=True, temperature=0.0, include_prompt=True)
    rows = dict(attention_layers=[1], head_reduction="none", attention_dtype="float32")
    spans = [(0, 4), (4, 15), (15, 40)]
    full = client.generate(**ask, **rows)
    summed = client.generate(**ask, **rows, attention_spans=spans)
    whole = {r.position: row_weights(r) for r in full.completions[0].attention}
    assert len(summed.completions[0].attention) == len(whole)
    for row in summed.completions[0].attention:
        assert row.num_spans == 3 and len(row.weights) == row.num_heads * 3 * 4
        for head, sums in enumerate(row_weights(row)):
            expected = [sum(whole[row.position][head][start:end]) for start, end in spans]
            assert sums == pytest.approx(expected, abs=1e-6)
            assert sum(sums) == pytest.approx(1.0, abs=1e-5)  # the spans cover every position


@pytest.mark.parametrize(
    ("spans", "top_k", "field"),
    [
        ([(3, 3)], 0, r"attention\.spans\[0\]"),
        ([(0, 2)] * 65, 0, r"attention\.spans"),
        ([(0, 2)], 2, r"spans or top_k"),
    ],
    ids=["empty-span", "too-many", "with-top-k"],
)
def test_bad_spans_are_refused(client: Client, spans: list[tuple[int, int]], top_k: int, field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        client.generate("hi", max_tokens=2, attention_layers=[0], attention_spans=spans, attention_top_k=top_k)
