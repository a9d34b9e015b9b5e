"""The door-neutral GenerationService before the engine: refusals cost no templating or tokenizing.

The engine is a stand-in here (only what a refusal may touch), so the test can assert that
the tokenizer is never reached."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from attnserve.server.api.errors import ErrorKind, ServiceError
from attnserve.server.api.records import ChatTurn, GenerationRequest
from attnserve.server.api.serving import GenerationService
from attnserve.server.config import parse_config
from attnserve.server.engine.records import EngineInfo
from attnserve.server.metrics import Metrics

INFO = EngineInfo(
    model_name="stand-in",
    architecture="llama",
    context_length=1024,
    vocab_size=384,
    max_token_chars=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    hidden_size=64,
    dtype="float32",
    device="cpu",
    kv_cache_blocks=64,
    kv_cache_block_size=16,
    kv_cache_bytes=1 << 20,
    max_num_seqs=4,
    max_num_waiting=4,
    max_num_batched_tokens=64,
    max_stream_backlog_bytes=1 << 20,
    layer_windows=(0, 0),
    batch_invariant=True,
    determinism="stand-in",
)


class NoTokenizing:
    def encode(self, *args: object, **kwargs: object) -> list[int]:
        raise AssertionError("the tokenizer was called for a request that had to be refused first")

    apply_chat_template = encode


def service_over(waiting_room: int) -> GenerationService:
    engine = SimpleNamespace(info=lambda: INFO, waiting_room=lambda: waiting_room, tokenizer=NoTokenizing())
    service = GenerationService(Metrics())
    service.attach(engine)  # type: ignore[arg-type]
    return service


def refusal(service: GenerationService, request: GenerationRequest) -> ServiceError:
    async def consume() -> None:
        async for _ in service.generate(request, timeout_s=None, whole_response=False):
            pass

    with pytest.raises(ServiceError) as caught:
        asyncio.run(consume())
    return caught.value


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(prompt="some words " * 1000),
        GenerationRequest(messages=[ChatTurn("user", "hi " * 1000)]),
    ],
    ids=["prompt", "chat"],
)
def test_a_full_queue_refuses_before_any_templating_or_tokenizing(request_: GenerationRequest) -> None:
    error = refusal(service_over(waiting_room=0), request_)
    assert error.kind is ErrorKind.RESOURCE_EXHAUSTED and "queue is full" in error.message


def test_n_completions_need_n_places_in_the_queue() -> None:
    error = refusal(service_over(waiting_room=2), GenerationRequest(prompt="x", n=3))
    assert error.kind is ErrorKind.RESOURCE_EXHAUSTED


def test_a_prompt_that_cannot_fit_is_refused_by_its_length_alone() -> None:
    # 1023 tokens of at most 16 characters each: 16,368 characters at most.
    error = refusal(service_over(waiting_room=4), GenerationRequest(prompt="y" * 16_369))
    assert error.kind is ErrorKind.INVALID_ARGUMENT and "cannot fit" in error.message
    error = refusal(service_over(waiting_room=4), GenerationRequest(messages=[ChatTurn("user", "z" * 4_000_000)]))
    assert error.kind is ErrorKind.INVALID_ARGUMENT and "messages" in error.message


def test_a_model_answers_to_its_served_names_and_aliases() -> None:
    """A GGUF is served as its file's stem, and its free-text general.name still works."""
    info = dataclasses.replace(INFO, model_name="SmolLM2-135M-Instruct", model_aliases=("Smollm2 135M 8k",))
    engine = SimpleNamespace(info=lambda: info, waiting_room=lambda: 0, tokenizer=NoTokenizing())
    service = GenerationService(Metrics())
    service.attach(engine)  # type: ignore[arg-type]
    for name in ("SmolLM2-135M-Instruct", "Smollm2 135M 8k", ""):
        # Past the model check, the full queue refuses it: the name was accepted.
        assert refusal(service, GenerationRequest(prompt="x", model=name)).kind is ErrorKind.RESOURCE_EXHAUSTED
    error = refusal(service, GenerationRequest(prompt="x", model="gpt-4"))
    assert error.kind is ErrorKind.INVALID_ARGUMENT and "SmolLM2-135M-Instruct" in error.message


def test_served_model_names_from_flags_and_environment() -> None:
    flags = parse_config(["--model", "dummy:tiny", "--served-model-name", "mine", "other"], environ={})
    assert flags.engine.served_model_names == ("mine", "other")
    env = parse_config(["--model", "dummy:tiny"], environ={"ATTNSERVE_SERVED_MODEL_NAME": "a, b"})
    assert env.engine.served_model_names == ("a", "b")


def test_whole_response_merges_each_completion_in_order_and_keeps_the_totals() -> None:
    """The one accumulator both doors' unary answers (and Engine.generate) are built with."""
    from attnserve.server.api.serving import CompletionDelta, WholeResponse
    from attnserve.server.engine.outputs import RequestOutput, Timings, Usage
    from attnserve.server.engine.request import FinishReason

    first = RequestOutput("r#1", [5], "a")
    deltas = [
        CompletionDelta("r", 1, first),
        CompletionDelta("r", 0, RequestOutput("r#0", [1, 2], "he")),
        CompletionDelta("r", 0, RequestOutput("r#0", [3], "llo", finish_reason=FinishReason.STOP, stop_reason=3)),
        CompletionDelta(
            "r",
            1,
            RequestOutput("r#1", [6], "b", finish_reason=FinishReason.LENGTH),
            usage=Usage(4, 5, 0),
            timings=Timings(0.1, 0.2, 0.3),
        ),
    ]
    whole = WholeResponse("")
    for delta in deltas:
        whole.add(delta)
    (i0, c0), (i1, c1) = whole.completions
    assert (i0, c0.token_ids, c0.text, c0.finish_reason, c0.stop_reason) == (
        0,
        [1, 2, 3],
        "hello",
        FinishReason.STOP,
        3,
    )
    assert (i1, c1.token_ids, c1.text, c1.finish_reason) == (1, [5, 6], "ab", FinishReason.LENGTH)
    assert whole.request_id == "r" and whole.usage == Usage(4, 5, 0) and whole.timings == Timings(0.1, 0.2, 0.3)
    assert first.token_ids == [5] and first.text == "a"  # the deltas themselves are left as they were
