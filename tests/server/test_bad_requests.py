"""Bad input gets the right status and a message naming the field; the server keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest

from attnserve.client import AttnserveError, Client
from attnserve.v1 import generate_pb2 as pb
from tests.server.server_process import ServerProcess

# The tiny model: vocab 384, 2 layers, context 1024.

pytestmark = pytest.mark.slow  # a real server process per module


def req(**fields) -> pb.GenerateRequest:
    r = pb.GenerateRequest(prompt="hello")
    sampling = fields.pop("sampling", {})
    stopping = fields.pop("stopping", {})
    for key, value in fields.items():
        if key in ("token_ids", "messages"):
            r.ClearField("prompt")
        if key == "token_ids":
            r.token_ids.extend(value)
        elif key == "messages":
            r.messages.extend(pb.ChatMessage(role=role, content=content) for role, content in value)
        elif key == "attention":
            r.attention.SetInParent()
            r.attention.layers.extend(value.get("layers", []))
            r.attention.head_reduction = value.get("head_reduction", 0)
            r.attention.include_prompt = value.get("include_prompt", False)
        elif key in ("logprobs", "prompt_logprobs"):
            getattr(r, key).top_n = value
        elif key == "no_input":
            r.ClearField("prompt")
        else:
            setattr(r, key, value)
    for key, value in sampling.items():
        setattr(r.sampling, key, value)
    for key, value in stopping.items():
        if isinstance(value, list):
            getattr(r.stopping, key).extend(value)
        else:
            setattr(r.stopping, key, value)
    return r


INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES = [
    ("empty prompt", req(prompt=""), INVALID, "prompt"),
    ("no input", req(no_input=True), INVALID, "input"),
    ("prompt longer than the context", req(prompt="a" * 1500), INVALID, "prompt"),
    ("negative temperature", req(sampling={"temperature": -0.5}), INVALID, "sampling.temperature"),
    ("NaN temperature", req(sampling={"temperature": math.nan}), INVALID, "sampling.temperature"),
    ("infinite temperature", req(sampling={"temperature": math.inf}), INVALID, "sampling.temperature"),
    ("top_p of 0", req(sampling={"top_p": 0.0}), INVALID, "sampling.top_p"),
    ("top_p above 1", req(sampling={"top_p": 1.5}), INVALID, "sampling.top_p"),
    ("negative top_k", req(sampling={"top_k": -1}), INVALID, "sampling.top_k"),
    ("min_p above 1", req(sampling={"min_p": 2.0}), INVALID, "sampling.min_p"),
    ("zero repetition penalty", req(sampling={"repetition_penalty": 0.0}), INVALID, "sampling.repetition_penalty"),
    ("max_tokens of 0", req(stopping={"max_tokens": 0}), INVALID, "stopping.max_tokens"),
    ("max_tokens past the context", req(stopping={"max_tokens": 1020}), INVALID, "stopping.max_tokens"),
    ("token id past the vocabulary", req(token_ids=[5, 999]), INVALID, "token_ids[1]"),
    ("negative token id", req(token_ids=[-3]), INVALID, "token_ids[0]"),
    ("more token ids than the context", req(token_ids=[5] * 1024), INVALID, "token_ids"),
    ("unknown chat role", req(messages=[("wizard", "hi")]), INVALID, "messages[0].role"),
    ("prompt and messages both", req(messages=[("user", "hi")], prompt="hi"), INVALID, "input"),
    ("prompt far past the context", req(prompt="a" * 1_000_000), INVALID, "cannot fit"),
    ("too many stop strings", req(stopping={"stop": [f"s{i}" for i in range(17)]}), INVALID, "stopping.stop"),
    ("empty stop string", req(stopping={"stop": [""]}), INVALID, "stopping.stop[0]"),
    ("stop string too long", req(stopping={"stop": ["x" * 300]}), INVALID, "stopping.stop[0]"),
    (
        "stop token id past the vocabulary",
        req(stopping={"stop_token_ids": [400]}),
        INVALID,
        "stopping.stop_token_ids[0]",
    ),
    ("attention on a layer that does not exist", req(attention={"layers": [2]}), INVALID, "attention.layers[0]"),
    ("attention on a negative layer out of range", req(attention={"layers": [0, -3]}), INVALID, "attention.layers[1]"),
    ("attention without layers", req(attention={"layers": []}), INVALID, "attention.layers"),
    (
        "unknown head reduction",
        req(attention={"layers": [0], "head_reduction": 9}),
        INVALID,
        "attention.head_reduction",
    ),
    ("too many logprobs", req(logprobs=50), INVALID, "logprobs.top_n"),
    ("too many prompt logprobs", req(prompt_logprobs=21), INVALID, "prompt_logprobs.top_n"),
    ("n of 0", req(n=0), INVALID, "n"),
    ("n past the limit", req(n=17), INVALID, "n"),
    (
        "attention too large for one request",
        req(attention={"layers": [0, 1], "head_reduction": 1, "include_prompt": True}, prompt="p" * 1000),
        INVALID,
        "no prompt rows",
    ),
    ("unknown model", req(model="gpt-4"), INVALID, "model"),
    ("request id too long", req(request_id="r" * 300), INVALID, "request_id"),
    ("oversize message", req(prompt="x" * (5 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
]


@pytest.mark.parametrize(("name", "request_", "code", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_status_naming_the_field(
    client: Client, name: str, request_: pb.GenerateRequest, code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(AttnserveError) as caught:
        client.send(request_)
    assert caught.value.code == code, f"{name}: {caught.value}"
    assert field in caught.value.message, f"{name}: message does not name {field!r}: {caught.value.message}"


def test_streaming_call_gets_the_same_status(tiny_server: ServerProcess) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        from attnserve.v1 import generate_pb2_grpc

        stub = generate_pb2_grpc.GeneratorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GenerateStream(req(sampling={"top_p": 7.0})))
        assert caught.value.code() == INVALID and "sampling.top_p" in caught.value.details()


def test_the_server_still_serves_after_the_bad_requests(client: Client) -> None:
    reply = client.generate("still alive", max_tokens=3, ignore_eos=True, temperature=0)
    assert reply.usage.completion_tokens == 3


def test_tokenize_without_input(client: Client) -> None:
    with pytest.raises(AttnserveError) as caught:
        client.tokenize()
    assert caught.value.code == INVALID and "input" in caught.value.message
