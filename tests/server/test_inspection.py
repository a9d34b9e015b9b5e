"""Look inside and steer through the real gRPC server: residual reads, the logit lens, steering and
head ablation; other requests untouched; the prefix cache kept apart; bad inputs refused before work.

The model-level equalities with transformers are in tests/model/test_hooks.py; here the server's
answers are checked against the same model code run in-process on the same (seeded) weights.
"""

from __future__ import annotations

import base64
import math
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attnserve.client import Ablate, Client, InvalidArgumentError, Steer, residual_values
from attnserve.model.attention import AttentionMetadata
from attnserve.model.hooks import LayerHooks
from attnserve.model.loader import load_model
from attnserve.v1 import generate_pb2 as pb
from tests.helpers import new_cache, scattered_block_tables

pytestmark = pytest.mark.slow  # a real server process
PROMPT = [5, 17, 99, 3, 42, 7, 250, 31, 8, 64, 12, 77, 19, 200, 4, 90, 33, 2, 150, 61]
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("dummy:tiny", dtype=torch.float32).model


@torch.inference_mode()
def _forward(model, tokens: list[int], hooks: dict[int, LayerHooks]) -> torch.Tensor:
    tables = scattered_block_tables([len(tokens)], 16)
    meta = AttentionMetadata.build(block_tables=tables, seq_lens=[len(tokens)], query_lens=[len(tokens)], block_size=16)
    meta.hooks = hooks
    return model(torch.tensor(tokens), meta.positions, new_cache(model, tables, 16), meta)


def test_residuals_and_lens_match_the_model_and_the_last_lens_is_the_choice(client: Client, tiny) -> None:
    info = client.model_info()
    assert info.hidden_size == tiny.config.hidden_size
    last = info.num_layers - 1
    reply = client.generate(
        token_ids=PROMPT,
        max_tokens=6,
        residual_points=["resid_pre", "resid_post"],
        residual_layers=[0, -1],
        logit_lens_layers=[0, last],
        logit_lens_top_k=3,
        **GREEDY,
    )
    completion = reply.completions[0]
    generated = list(completion.token_ids)
    p = len(PROMPT)
    # One vector per generated token, layer and point, at the row that predicted it.
    assert len(completion.residuals) == 6 * 2 * 2
    assert sorted({r.position for r in completion.residuals}) == list(range(p - 1, p + 5))
    rows = torch.arange(p + 5)
    hooks = {0: LayerHooks(reads={"resid_pre": rows}), last: LayerHooks(reads={"resid_post": rows})}
    _forward(tiny, PROMPT + generated[:-1], hooks)
    for r in completion.residuals:
        if (r.layer, r.point) in ((0, pb.RESIDUAL_POINT_RESID_PRE), (last, pb.RESIDUAL_POINT_RESID_POST)):
            name = "resid_pre" if r.layer == 0 else "resid_post"
            expected = hooks[r.layer].captured[name][r.position]
            assert (torch.tensor(residual_values(r)) - expected).abs().max().item() <= 1e-5
    lens = {(row.layer, row.position): row for row in completion.logit_lens}
    assert len(lens) == 2 * 6
    for i, token in enumerate(generated):
        top = lens[(last, p - 1 + i)]
        assert top.token_ids[0] == token  # the last layer's lens is the model's own distribution
        assert len(top.token_ids) == 3 and all(a >= b for a, b in zip(top.probs, top.probs[1:], strict=False))
        assert 0 < sum(top.probs) <= 1.0 + 1e-6


def test_steering_and_ablation_follow_the_model_hooks(client: Client, tiny) -> None:
    hidden = tiny.config.hidden_size
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(5)) * 3
    plain = list(client.generate(token_ids=PROMPT, max_tokens=8, **GREEDY).completions[0].token_ids)
    steer = Steer(layer=1, vector=vector.tolist(), scale=2.0, point="resid_post", positions="generated")
    steered = list(client.generate(token_ids=PROMPT, max_tokens=8, steering=[steer], **GREEDY).completions[0].token_ids)
    assert steered[0] == plain[0]  # generated positions only: the prompt's rows, and so the first token, unchanged
    assert steered != plain
    # Teacher-forced through the model with the same hook: each steered token is its argmax.
    p = len(PROMPT)
    rows = torch.arange(p, p + 7)
    logits = _forward(
        tiny, PROMPT + steered[:-1], {1: LayerHooks(steering={"resid_post": (rows, (2.0 * vector).expand(7, -1))})}
    )
    assert logits[p - 1 :].argmax(-1).tolist() == steered

    heads = list(range(tiny.config.num_heads))
    ablated = client.generate(token_ids=PROMPT, max_tokens=8, ablations=[Ablate(layer=0, heads=heads)], **GREEDY)
    tokens = list(ablated.completions[0].token_ids)
    factors = torch.zeros(p + 7, tiny.config.num_heads)
    logits = _forward(tiny, PROMPT + tokens[:-1], {0: LayerHooks(head_scales=(torch.arange(p + 7), factors))})
    assert logits[p - 1 :].argmax(-1).tolist() == tokens


def test_sixteen_concurrent_four_steered_the_other_twelve_bit_identical(client: Client, tiny) -> None:
    hidden = tiny.config.hidden_size
    prompts = [[(7 * i + j) % 300 + 3 for j in range(9 + i)] for i in range(16)]
    vector = [0.5] * hidden

    def run(i: int, intervene: bool) -> tuple[list[int], list[float]]:
        extra = {}
        if intervene:
            extra = (
                {"steering": [Steer(layer=0, vector=vector, scale=4.0)]}
                if i % 2
                else {"ablations": [Ablate(1, [0, 2])]}
            )
        reply = client.generate(token_ids=prompts[i], max_tokens=10, logprobs=0, seed=i, temperature=0.8, **extra)
        c = reply.completions[0]
        return list(c.token_ids), [lp.logprob for lp in c.logprobs]

    alone = [run(i, False) for i in range(16)]
    intervened = {1, 6, 11, 15}
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: run(i, i in intervened), range(16)))
    for i in range(16):
        if i not in intervened:
            assert together[i] == alone[i], f"request {i} changed beside the steered ones"
    assert any(together[i] != alone[i] for i in intervened)


def test_interventions_never_share_the_prefix_cache_with_plain_requests(client: Client) -> None:
    prompt = [11 + (i % 200) for i in range(70)]
    first = client.generate(token_ids=prompt, max_tokens=2, **GREEDY)
    again = client.generate(token_ids=prompt, max_tokens=2, **GREEDY)
    assert first.usage.cached_tokens == 0 and again.usage.cached_tokens >= 64
    ablate = [Ablate(layer=0, heads=[1])]
    steered = client.generate(token_ids=prompt, max_tokens=2, ablations=ablate, **GREEDY)
    assert steered.usage.cached_tokens == 0
    steered_again = client.generate(token_ids=prompt, max_tokens=2, ablations=ablate, **GREEDY)
    assert steered_again.usage.cached_tokens >= 64  # the same interventions share among themselves
    assert (
        client.generate(token_ids=prompt, max_tokens=2, **GREEDY).completions[0].token_ids
        == again.completions[0].token_ids
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steering": [Steer(layer=0, vector=[1.0] * 3)]}, "steering[0].vector"),
        ({"steering": [Steer(layer=0, vector=[math.nan] * 64)]}, "steering[0].vector"),
        ({"steering": [Steer(layer=0, vector=[1.0] * 64)] * 33}, "steering"),
        ({"steering": [Steer(layer=9, vector=[1.0] * 64)]}, "steering[0].layer"),
        ({"steering": [Steer(layer=0, vector=[1.0] * 64, point="attn_out")]}, "steering[0].point"),
        ({"steering": [Steer(layer=0, vector=[1.0] * 64, scale=math.inf)]}, "steering[0].scale"),
        ({"ablations": [Ablate(layer=0, heads=[99])]}, "ablations[0].heads[0]"),
        ({"residual_points": ["resid_pre"], "residual_layers": [5]}, "residuals.layers[0]"),
        ({"logit_lens_layers": [0], "logit_lens_top_k": 500}, "logit_lens.top_k"),
    ],
)
def test_bad_inspection_requests_are_refused_naming_the_field(client: Client, kwargs: dict, field: str) -> None:
    if kwargs.get("steering") and kwargs["steering"][0].vector == [1.0] * 64:
        hidden = client.model_info().hidden_size
        kwargs = {**kwargs, "steering": [Steer(**{**s.__dict__, "vector": [1.0] * hidden}) for s in kwargs["steering"]]}
    if kwargs.get("steering") and math.isnan(kwargs["steering"][0].vector[0]):
        hidden = client.model_info().hidden_size
        kwargs = {**kwargs, "steering": [Steer(layer=0, vector=[1.0] * (hidden - 1) + [math.nan])]}
    with pytest.raises(InvalidArgumentError) as caught:
        client.generate(token_ids=PROMPT * 10, **{"max_tokens": 4, **kwargs})
    assert field in str(caught.value)
    assert client.generate(token_ids=PROMPT, max_tokens=2).completions[0].token_ids  # still serving


def test_vector_bytes_must_be_float32_little_endian(client: Client) -> None:
    hidden = client.model_info().hidden_size
    request = pb.GenerateRequest(token_ids=PROMPT)
    request.stopping.max_tokens = 2
    request.steering.add(layer=0, vector=struct.pack(f"<{hidden}d", *([0.1] * hidden)))  # float64: twice the bytes
    with pytest.raises(InvalidArgumentError, match=r"steering\[0\]\.vector"):
        client.send(request)


def test_the_openai_door_takes_the_same_options_as_extra_body(client: Client, tiny_server) -> None:
    openai = pytest.importorskip("openai")
    hidden = client.model_info().hidden_size
    vector = [0.25 * ((i % 7) - 3) for i in range(hidden)]
    extra = {
        "residuals": {"points": ["resid_post"], "layers": [-1], "dtype": "float16"},
        "logit_lens": {"layers": [0, 1], "top_k": 2},
        "steering": [{"layer": 1, "vector": vector, "scale": 3.0, "point": "resid_mid"}],
        "ablations": [{"layer": 0, "heads": [1]}],
        "ignore_eos": True,
        "return_token_ids": True,
    }
    sdk = openai.OpenAI(base_url=f"{tiny_server.http_url}/v1", api_key="x", max_retries=0, timeout=60)
    choice = sdk.completions.create(model="tiny", prompt="look inside", max_tokens=5, temperature=0, extra_body=extra)
    choice = choice.model_dump()["choices"][0]
    by_grpc = client.generate(
        "look inside",
        max_tokens=5,
        residual_points=["resid_post"],
        residual_layers=[-1],
        residual_dtype="float16",
        logit_lens_layers=[0, 1],
        logit_lens_top_k=2,
        steering=[Steer(layer=1, vector=vector, scale=3.0, point="resid_mid")],
        ablations=[Ablate(layer=0, heads=[1])],
        **GREEDY,
    ).completions[0]
    assert choice["token_ids"] == list(by_grpc.token_ids)
    assert [r["position"] for r in choice["residuals"]] == [r.position for r in by_grpc.residuals]
    assert [base64.b64decode(r["values"]) for r in choice["residuals"]] == [r.values for r in by_grpc.residuals]
    lens = choice["logit_lens"]
    assert len(lens) == 10 and all(len(row["tokens"]) == len(row["token_ids"]) == 2 for row in lens)
    assert [row["token_ids"] for row in lens] == [list(r.token_ids) for r in by_grpc.logit_lens]
    with pytest.raises(openai.BadRequestError, match=r"steering\[0\]\.vector"):
        sdk.completions.create(
            model="tiny", prompt="x", max_tokens=2, extra_body={"steering": [{"layer": 0, "vector": [1.0]}]}
        )


def test_the_cli_prints_the_lens_and_sends_steering_and_ablations(tiny_server, tmp_path, capsys) -> None:
    from attnserve.client import __main__ as cli

    with Client(tiny_server.target) as c:
        hidden = c.model_info().hidden_size
    vector = tmp_path / "direction.txt"
    vector.write_text(" ".join(["0.5"] * hidden))
    argv = ["generate", "hi", "--target", tiny_server.target, "--max-tokens", "3", "--temperature", "0", "--ignore-eos"]
    assert cli.main([*argv, "--logit-lens", "0,-1", "--steer", f"1:2.0:{vector}:resid_post", "--ablate", "0:1,2"]) == 0
    err = capsys.readouterr().err
    assert "logit lens" in err and "L0" in err and "L1" in err
    assert len([line for line in err.splitlines()[2:] if line.strip()]) == 3  # one line per generated token
    with pytest.raises(SystemExit):
        cli.main([*argv, "--ablate", "zero"])
