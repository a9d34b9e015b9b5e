"""The OpenAI-compatible HTTP door end to end: a real server process on loopback, driven by the
real `openai` SDK (sync, async, streaming), plain urllib, the CLI's --http mode and the load
generator's openai backend."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from attnserve.client import Client
from tests.server.server_process import ServerProcess, wait_for

pytestmark = pytest.mark.slow  # real server processes

TINY = ["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "64MiB"]
GREEDY: dict[str, Any] = dict(temperature=0.0)
LONG = {"ignore_eos": True}  # extra_body: generate exactly max_tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model with the gateway gauges on (--vllm-metric-names)."""
    args = [*TINY, "--max-num-waiting", "64", "--max-attention-bytes-per-request", "4MiB", "--vllm-metric-names"]
    proc = ServerProcess(args).start(tmp_path_factory.mktemp("openai") / "server.log")
    try:
        yield proc.wait_serving()
    finally:
        proc.stop()


def sdk(server: ServerProcess, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def http(url: str, body: dict | bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body or text) of a GET (no body) or a JSON POST; errors are returned, not raised."""
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            status, raw = reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def samples(exposition: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition, by name."""
    pairs = (line.rsplit(" ", 1) for line in exposition.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in pairs if "{" not in name}


def row_array(row: dict[str, Any]) -> np.ndarray:
    dtype = {"float16": "<f2", "float32": "<f4"}[row["dtype"]]
    weights = np.frombuffer(base64.b64decode(row["weights"]), dtype=dtype).astype(np.float32)
    return weights.reshape(row["num_heads"], row["context_len"])


# ---------------------------------------------------------------- the SDK, sync
def test_models_and_a_sync_completion_with_logprobs(server: ServerProcess) -> None:
    client = sdk(server)
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.model_extra == {"batch_invariant": True}
    reply = client.completions.create(
        model="tiny", prompt="Hello there", max_tokens=6, logprobs=2, extra_body=LONG, **GREEDY
    )
    (choice,) = reply.choices
    assert reply.object == "text_completion" and reply.model == "tiny" and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    # Token texts: one per token (a byte of a split UTF-8 character reads as U+FFFD), offsets add up.
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 2  # two alternatives; tokens that decode to the same text share a key
        assert chosen >= max(top.values()) - 1e-6  # greedy picks the most likely
    assert reply.usage.prompt_tokens == len("Hello there") and reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == len("Hello there") + 6


def test_a_sync_chat_with_logprobs(server: ServerProcess) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = sdk(server).chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=5, logprobs=True, top_logprobs=2, extra_body=LONG
    )
    (choice,) = reply.choices
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    content = choice.logprobs.content
    assert len(content) == 5 and all(c.token and c.bytes for c in content)
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    assert reply.usage.completion_tokens == 5


def test_usage_counts_cached_prompt_tokens(server: ServerProcess) -> None:
    client, prompt = sdk(server), "a prompt long enough to fill two blocks of sixteen tokens " * 2
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **GREEDY)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == len(prompt)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 * (len(prompt) // 16 - 1) and cached % 16 == 0, cached  # whole blocks
    assert first.usage.prompt_tokens_details.cached_tokens < cached


def test_stop_strings(server: ServerProcess) -> None:
    client = sdk(server)
    whole = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=40, extra_body=LONG, **GREEDY)
    text = whole.choices[0].text
    stop = text[6:9]
    cut = client.completions.create(
        model="tiny", prompt=[5, 6, 7], max_tokens=40, stop=[stop, "never"], extra_body=LONG, **GREEDY
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "stop here"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, extra_body=LONG, **GREEDY)
    said = chat.choices[0].message.content
    stop = said[4:7]
    cut_chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=30, stop=stop, extra_body=LONG, **GREEDY
    )
    assert cut_chat.choices[0].message.content == said[: said.index(stop)]
    assert cut_chat.choices[0].finish_reason == "stop"


def test_the_attention_extension(server: ServerProcess) -> None:
    prompt = [5, 77, 120, 33, 250, 9]
    ask = {"attention": {"layers": [0, -1], "head_reduction": "none", "include_prompt": True}, **LONG}
    reply = sdk(server).completions.create(model="tiny", prompt=prompt, max_tokens=3, extra_body=ask, **GREEDY)
    rows = reply.model_dump()["choices"][0]["attention"]
    positions = range(len(prompt) + 3 - 1)  # prompt rows, then one per generated token but the last
    assert sorted((r["layer"], r["position"]) for r in rows) == [(layer, p) for layer in (0, 1) for p in positions]
    with Client(server.target) as grpc_client:
        num_heads = grpc_client.model_info().num_heads
    for row in rows:
        weights = row_array(row)
        assert weights.shape == (num_heads, row["position"] + 1) and row["context_len"] == row["position"] + 1
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-3)
    mean = sdk(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "look"}],
        max_tokens=2,
        extra_body={"attention": {"layers": [1], "head_reduction": "mean"}},
    )
    rows = mean.model_dump()["choices"][0]["attention"]
    assert len(rows) == 2 and all(row_array(r).shape == (1, r["context_len"]) for r in rows)
    np.testing.assert_allclose([row_array(r).sum() for r in rows], 1.0, atol=1e-3)


def test_attention_rows_come_in_the_dtype_asked_for(server: ServerProcess) -> None:
    ask = {"attention": {"layers": [1], "dtype": "float16"}}
    reply = sdk(server).completions.create(model="tiny", prompt="half", max_tokens=2, extra_body=ask)
    rows = reply.model_dump()["choices"][0]["attention"]
    assert [r["dtype"] for r in rows] == ["float16", "float16"]
    assert all(len(base64.b64decode(r["weights"])) == 2 * r["context_len"] for r in rows)


def test_top_k_attention_rows_over_http(server: ServerProcess) -> None:
    """extra_body attention.top_k: each row carries its k largest weights and their positions."""
    ask: dict[str, Any] = dict(model="tiny", prompt="a longer prompt to rank", max_tokens=3, **GREEDY)
    full = sdk(server).completions.create(**ask, extra_body={**LONG, "attention": {"layers": [1], "dtype": "float32"}})
    top_k = {"layers": [1], "dtype": "float32", "top_k": 2}
    top = sdk(server).completions.create(**ask, extra_body={**LONG, "attention": top_k})
    whole = {r["position"]: row_array(r)[0] for r in full.model_dump()["choices"][0]["attention"]}
    for row in top.model_dump()["choices"][0]["attention"]:
        kept = np.frombuffer(base64.b64decode(row["weights"]), dtype="<f4")
        keys = np.frombuffer(base64.b64decode(row["positions"]), dtype="<i4")
        assert row["num_kept"] == 2 == len(kept) == len(keys)
        np.testing.assert_array_equal(kept, whole[row["position"]][keys])
        np.testing.assert_array_equal(kept, np.sort(whole[row["position"]])[::-1][:2])


def test_span_sums_over_http(server: ServerProcess) -> None:
    ask: dict[str, Any] = dict(model="tiny", prompt="how much of each part", max_tokens=2, **GREEDY)
    spans = {"layers": [0], "dtype": "float32", "head_reduction": "mean", "spans": [[0, 3], [3, 64]]}
    reply = sdk(server).completions.create(**ask, extra_body={**LONG, "attention": spans})
    for row in reply.model_dump()["choices"][0]["attention"]:
        sums = np.frombuffer(base64.b64decode(row["weights"]), dtype="<f4")
        assert row["num_spans"] == 2 == len(sums) and abs(float(sums.sum()) - 1.0) < 1e-5


# ------------------------------------------------------------------- streaming
def test_a_streamed_completion_equals_the_whole_one(server: ServerProcess) -> None:
    client = sdk(server)
    ask: dict[str, Any] = dict(model="tiny", prompt="stream me", max_tokens=24, extra_body=LONG, **GREEDY)
    whole = client.completions.create(**ask)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **ask))
    *deltas, last = chunks
    assert "".join(c.choices[0].text for c in deltas) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in deltas][-1] == "length"
    assert not any(c.choices[0].finish_reason for c in deltas[:-1]) and len(deltas) > 10
    assert last.choices == [] and last.usage.completion_tokens == 24  # include_usage: a last, choice-less chunk
    assert all(c.usage is None for c in deltas) and len({c.id for c in chunks}) == 1


def test_a_streamed_chat_with_attention_rows_on_each_chunk(server: ServerProcess) -> None:
    client = sdk(server)
    ask: dict[str, Any] = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, **GREEDY)
    whole = client.chat.completions.create(extra_body=LONG, **ask)
    stream = client.chat.completions.create(
        stream=True, extra_body={"attention": {"layers": [0]}, **LONG}, logprobs=True, **ask
    )
    opening, *chunks = list(stream)
    assert opening.choices[0].delta.role == "assistant" and opening.object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert sum(len(c.choices[0].logprobs.content) for c in chunks) == 12
    rows = [row for c in chunks for row in c.model_dump()["choices"][0]["attention"]]
    assert len(rows) == 12 and all(len(c.model_dump()["choices"][0]["attention"]) <= 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


# ------------------------------------------------------------------- the SDK, async
def test_the_async_sdk(server: ServerProcess) -> None:
    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0, timeout=60)
        ask: dict[str, Any] = dict(model="tiny", max_tokens=8, extra_body=LONG, **GREEDY)
        prompts = [f"async {i}" for i in range(4)]
        replies = await asyncio.gather(*(client.completions.create(prompt=p, **ask) for p in prompts))
        streamed = []
        for p in prompts:
            stream = await client.completions.create(prompt=p, stream=True, **ask)
            streamed.append("".join([c.choices[0].text async for c in stream]))
        assert streamed == [r.choices[0].text for r in replies]
        chat = await client.chat.completions.create(messages=[{"role": "user", "content": "async"}], **ask)
        assert chat.usage.completion_tokens == 8
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="tiny", prompt="x", top_p=2.0)
        await client.close()

    asyncio.run(go())


# ------------------------------------------------------------------- the same engine
def test_grpc_and_http_give_the_same_tokens_for_the_same_greedy_request(server: ServerProcess) -> None:
    client = sdk(server)
    with Client(server.target, timeout=60) as grpc_client:
        for prompt in ("The same greedy request", "another one, a little longer than the first"):
            by_grpc = grpc_client.generate(prompt, max_tokens=32, ignore_eos=True, **GREEDY).completions[0]
            ask: dict[str, Any] = dict(model="tiny", prompt=prompt, max_tokens=32, **GREEDY)
            ask["extra_body"] = {"return_token_ids": True, **LONG}
            by_http = client.completions.create(**ask).model_dump()["choices"][0]
            streamed = [c.model_dump()["choices"][0] for c in client.completions.create(stream=True, **ask)]
            assert by_http["token_ids"] == list(by_grpc.token_ids) and len(by_grpc.token_ids) == 32
            assert by_http["text"] == by_grpc.text
            assert [t for c in streamed for t in c["token_ids"]] == list(by_grpc.token_ids)
        chat = [("user", "What is attention?")]
        by_grpc = grpc_client.generate(messages=chat, max_tokens=16, ignore_eos=True, **GREEDY).completions[0]
    by_http = client.chat.completions.create(
        model="tiny",
        messages=[{"role": r, "content": c} for r, c in chat],
        max_tokens=16,
        extra_body={"return_token_ids": True, **LONG},
        **GREEDY,
    ).model_dump()["choices"][0]
    assert by_http["token_ids"] == list(by_grpc.token_ids) and by_http["message"]["content"] == by_grpc.text


# ------------------------------------------------------------------- errors
def test_bad_input_is_400_with_the_param(server: ServerProcess) -> None:
    client = sdk(server)
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(prompt="x", max_tokens=-1), "max_tokens"),
        (dict(prompt="x", temperature=-0.5), "temperature"),
        (dict(prompt="x", top_p=1.5), "top_p"),
        (dict(prompt="x", frequency_penalty=0.5), "frequency_penalty"),
        (dict(prompt="x", extra_body={"top_k": "many"}), "top_k"),
        (dict(prompt="x", extra_body={"attention": {"layers": [99]}}), "attention.layers[0]"),
        (dict(prompt="x" * 5000, max_tokens=4), "prompt"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny", **kwargs)
        error = caught.value
        assert error.status_code == 400 and error.body["type"] == "invalid_request_error", kwargs
        assert error.body["param"] == param and error.body["message"], (param, error.body)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert caught.value.body["param"] == "top_logprobs"
    status, body = http(f"{server.http_url}/v1/chat/completions", {"model": "tiny", "messages": "not a list"})
    assert status == 400 and body["error"]["param"] == "messages", body
    status, body = http(f"{server.http_url}/v1/completions", b'{"prompt": "x",')
    assert status == 400 and body["error"]["param"] is None and "not valid JSON" in body["error"]["message"], body


def test_an_unknown_model_is_404(server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(server).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404 and caught.value.body["code"] == "model_not_found"
    assert "tiny" in caught.value.body["message"]


def test_a_body_over_the_message_limit_is_413_before_it_is_read_and_a_long_prompt_400(server: ServerProcess) -> None:
    big = json.dumps({"prompt": "a" * (5 << 20)}).encode()
    status, body = http(f"{server.http_url}/v1/completions", big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # Under the limit but far past the context: refused by its length, before any tokenizing.
    status, body = http(f"{server.http_url}/v1/completions", {"prompt": "b" * (3 << 20)})
    assert status == 400 and body["error"]["param"] == "prompt" and "cannot fit" in body["error"]["message"]
    status, _ = http(f"{server.http_url}/v1/models")
    assert status == 200  # and the server goes on


def test_past_the_deadline_is_504_and_frees_the_blocks(server: ServerProcess) -> None:
    client = sdk(server)
    deadline = {"x-request-timeout": "0.3"}
    ask: dict[str, Any] = dict(model="tiny", prompt="slow", max_tokens=1000, extra_body=LONG, extra_headers=deadline)
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**ask)
    assert caught.value.status_code == 504 and caught.value.body["code"] == "timeout"
    with pytest.raises(openai.APIError, match="deadline"):  # streamed: the 200 is sent, the error comes in the stream
        for _ in client.completions.create(stream=True, **ask):
            pass
    wait_for(lambda: server.is_idle(), timeout=5.0)


def test_a_client_that_hangs_up_mid_stream_frees_its_blocks_at_once(server: ServerProcess) -> None:
    cancelled = server.metric("attnserve_request_failure_total", 'reason="cancelled"', default=0.0)
    stream = sdk(server).completions.create(
        model="tiny", prompt="cancel me", max_tokens=1000, stream=True, extra_body=LONG, **GREEDY
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert server.metric("vllm:num_requests_running") == 1 and server.metric("vllm:kv_cache_usage_perc") > 0
    stream.close()  # drops the connection
    took = wait_for(lambda: server.metric("vllm:kv_cache_usage_perc") == 0, timeout=1.0)
    assert server.metric("vllm:num_requests_running") == 0, took
    after = server.metric("attnserve_request_failure_total", 'reason="cancelled"', default=0.0)
    assert after == cancelled + 1  # aborted, not run to its 1000 tokens


# ------------------------------------------------------------------- the gateway's view
def test_health_and_the_gateway_gauges(server: ServerProcess) -> None:
    assert http(f"{server.http_url}/health")[0] == 200
    status, text = http(f"{server.http_url}/metrics")
    assert status == 200
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc"):
        assert f"# TYPE vllm:{name} gauge" in text, name
    stream = sdk(server).completions.create(model="tiny", prompt="gauge", max_tokens=1000, stream=True, extra_body=LONG)
    next(iter(stream))
    values = samples(http(f"{server.http_url}/metrics")[1])  # one scrape: the stream keeps generating
    assert values["vllm:num_requests_running"] == values["attnserve_num_requests_running"] == 1
    assert values["vllm:num_requests_waiting"] == values["attnserve_num_requests_waiting"] == 0
    kv = values["vllm:kv_cache_usage_perc"]  # may grow by a block between the two gauges' reads
    assert 0 < kv < 1 and kv == pytest.approx(values["attnserve_kv_cache_usage_perc"], abs=1e-3)
    stream.close()
    wait_for(lambda: server.metric("vllm:num_requests_running") == 0, timeout=2.0)


def test_auth_401_without_the_token_and_no_vllm_names_without_the_flag(tmp_path: Path, tmp_token: Path) -> None:
    proc = ServerProcess([*TINY, "--auth-token-file", str(tmp_token)]).start(tmp_path / "auth.log")
    try:
        proc.wait_serving()
        ask = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        status, body = http(f"{proc.http_url}/v1/completions", ask)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
        assert http(f"{proc.http_url}/v1/models")[0] == 401
        with pytest.raises(openai.AuthenticationError):
            sdk(proc, api_key="wrong").completions.create(**ask)
        good = sdk(proc, api_key="s3cret-token").completions.create(**ask, extra_body=LONG)
        assert good.usage.completion_tokens == 2
        assert http(f"{proc.http_url}/health")[0] == 200  # probes need no token
        metrics = http(f"{proc.http_url}/metrics")[1]
        assert "attnserve_num_requests_waiting" in metrics and "vllm:" not in metrics
    finally:
        proc.stop()


def test_a_full_queue_is_429(tmp_path: Path) -> None:
    proc = ServerProcess([*TINY, "--max-num-seqs", "1", "--max-num-waiting", "1"]).start(tmp_path / "queue.log")
    try:
        proc.wait_serving()
        client = sdk(proc)
        running = client.completions.create(model="tiny", prompt="a", max_tokens=1000, stream=True, extra_body=LONG)
        next(iter(running))  # admitted and running: the one sequence slot is taken
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model="tiny", prompt="b", max_tokens=2, extra_body=LONG)
            wait_for(lambda: proc.metric("attnserve_num_requests_waiting") == 1, timeout=10)
            with pytest.raises(openai.RateLimitError) as caught:
                client.completions.create(model="tiny", prompt="c", max_tokens=2)
            assert caught.value.status_code == 429 and caught.value.body["code"] == "rate_limit_exceeded"
            assert "queue is full" in caught.value.body["message"]
            running.close()
            assert waiting.result(timeout=30).usage.completion_tokens == 2  # and it keeps serving
    finally:
        proc.stop()


def test_health_is_200_only_while_serving_and_draining_is_503(tmp_path: Path) -> None:
    proc = ServerProcess([*TINY, "--shutdown-timeout", "30"]).start(tmp_path / "drain.log")
    try:
        first = _first_http_health(proc)
        assert first == 503, "HTTP answers before the model is warm, and says it is not ready"
        proc.wait_serving()
        assert http(f"{proc.http_url}/health")[0] == 200
        tokens: list[int] = []
        finishes: list[str | None] = []
        started = threading.Event()

        def stream() -> None:
            ask = {"return_token_ids": True, **LONG}
            for chunk in sdk(proc).completions.create(
                model="tiny", prompt="drain", max_tokens=1000, stream=True, extra_body=ask, **GREEDY
            ):
                choice = chunk.model_dump()["choices"][0]
                tokens.extend(choice["token_ids"])
                finishes.append(choice["finish_reason"])
                started.set()

        worker = threading.Thread(target=stream)
        worker.start()
        assert started.wait(30)
        assert proc.proc is not None
        proc.proc.send_signal(15)
        wait_for(lambda: http(f"{proc.http_url}/health")[0] == 503, timeout=10)
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(proc).completions.create(model="tiny", prompt="late", max_tokens=2)
        assert caught.value.status_code == 503 and "shutting down" in caught.value.body["message"]
        assert not any(finishes), "the stream must still be running when the late request is refused"
        worker.join(60)
        assert len(tokens) == 1000 and finishes[-1] == "length"  # the in-flight stream finished
        assert proc.proc.wait(60) == 0, proc.log()
    finally:
        proc.stop()


def _first_http_health(proc: ServerProcess, timeout: float = 60.0) -> int:
    """The status of the first /health that answers (the port binds before the model loads)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return http(f"{proc.http_url}/health")[0]
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.02)
    raise AssertionError("HTTP never answered")


# ------------------------------------------------------------------- our own tools over HTTP
def test_the_cli_http_mode(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from attnserve.client.__main__ import main

    ask = ["--max-tokens", "8", "--ignore-eos", "--temperature", "0"]
    expected = sdk(server).completions.create(model="tiny", prompt="cli", max_tokens=8, extra_body=LONG, **GREEDY)
    assert main(["generate", "cli", "--http", server.http_url, *ask]) == 0
    assert capsys.readouterr().out == expected.choices[0].text + "\n"
    assert main(["generate", "cli", "--target", server.http_url, "--stream", "-v", *ask]) == 0
    out, err = capsys.readouterr()
    assert out == expected.choices[0].text + "\n" and "8 tokens, finish length" in err
    assert main(["generate", "Hi", "--http", server.http_url, "--chat", "--stream", *ask]) == 0
    chat = sdk(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, extra_body=LONG, **GREEDY
    )
    assert capsys.readouterr().out == chat.choices[0].message.content + "\n"
    assert main(["info", "--http", server.http_url]) == 0
    out = capsys.readouterr().out
    assert "health: SERVING" in out and "id: tiny" in out
    assert main(["generate", "x", "--http", server.http_url, "--top-p", "3"]) == 1
    assert "HTTP 400" in capsys.readouterr().err


def test_the_load_generator_openai_backend(server: ServerProcess, tmp_path: Path) -> None:
    from attnserve.client.bench import main

    out = tmp_path / "bench.json"
    args = ["--backend", "openai", "--target", server.http_url, "--concurrency", "2"]  # no --model: the served one
    args += ["--num-requests", "4", "--input-len", "8", "--output-len", "12", "--json", str(out), "--no-progress"]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["failed"] == 0 and row["output_tokens"] == 4 * 12, row
    assert row["ttft_p50_ms"] > 0 and row["itl_p50_ms"] > 0
