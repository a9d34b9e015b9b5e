"""Residual reads, the logit lens, steering and head ablation (model/hooks.py) against transformers, fp32.

transformers' hidden_states[l] is layer l's input (our resid_pre), and its last entry is the final
norm of the last layer's output; steering there is a forward hook adding the vector to a layer's
output (our resid_post) or input (resid_pre); ablation zeroes a head's slice of o_proj's input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.hooks import LayerHooks
from attnserve.model.loader import load_model
from tests.helpers import new_cache, save_tiny_hf_model, scattered_block_tables, write_byte_tokenizer

PROMPT = [5, 17, 99, 3, 42, 7, 250, 31, 8, 64, 12]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    folder: Path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    hf = save_tiny_hf_model(folder, "llama", initializer_range=0.1, tie_word_embeddings=False)
    write_byte_tokenizer(folder)
    return hf, load_model(folder, dtype=torch.float32).model


@torch.inference_mode()
def _ours(model, hooks: dict[int, LayerHooks], prompts: list[list[int]] = [PROMPT]) -> torch.Tensor:  # noqa: B006
    lengths = [len(p) for p in prompts]
    tables = scattered_block_tables(lengths, 16)
    meta = AttentionMetadata.build(block_tables=tables, seq_lens=lengths, query_lens=lengths, block_size=16)
    meta.hooks = hooks
    ids = torch.tensor([t for p in prompts for t in p])
    return model(ids, meta.positions, new_cache(model, tables, 16), meta)


def _all_rows(n: int = len(PROMPT)) -> torch.Tensor:
    return torch.arange(n)


def test_residual_reads_equal_hidden_states_and_the_lens_equals_norm_then_head(models) -> None:
    hf, ours = models
    layers = ours.config.num_layers
    hooks = {
        layer: LayerHooks(reads={p: _all_rows() for p in ("resid_pre", "resid_mid", "resid_post")})
        for layer in range(layers)
    }
    logits = _ours(ours, hooks)
    with torch.inference_mode():
        theirs = hf(torch.tensor([PROMPT]), output_hidden_states=True)
    for layer in range(layers):
        expected = theirs.hidden_states[layer][0]
        assert (hooks[layer].captured["resid_pre"] - expected).abs().max().item() <= 1e-5, layer
        if layer + 1 < layers:
            after = theirs.hidden_states[layer + 1][0]
            assert (hooks[layer].captured["resid_post"] - after).abs().max().item() <= 1e-5, layer
    last = hooks[layers - 1].captured["resid_post"]
    final_norm = hf.model.norm(last)
    assert (final_norm - theirs.hidden_states[layers][0]).abs().max().item() <= 1e-5
    with torch.inference_mode():
        for layer in range(layers):  # the lens: final norm and unembedding of each layer's output
            lens = ours.logit_lens(hooks[layer].captured["resid_post"])
            expected = hf.lm_head(hf.model.norm(hooks[layer].captured["resid_post"]))
            assert (lens - expected).abs().max().item() <= 1e-4
        assert (ours.logit_lens(last) - logits).abs().max().item() <= 1e-5  # the last layer's lens: the logits
    # attn_out and mlp_out add up: resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out.
    more = {
        1: LayerHooks(reads={p: _all_rows() for p in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")})
    }
    _ours(ours, more)
    c = more[1].captured
    assert torch.allclose(c["resid_pre"] + c["attn_out"], c["resid_mid"], atol=1e-6)
    assert torch.allclose(c["resid_mid"] + c["mlp_out"], c["resid_post"], atol=1e-6)


@pytest.mark.parametrize("point", ["resid_pre", "resid_post"])
def test_steering_equals_a_transformers_forward_hook(models, point: str) -> None:
    hf, ours = models
    layer, scale = 1, 4.0
    vector = torch.randn(ours.config.hidden_size, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([2, 5, 6, 10])  # some positions only
    steered = _ours(ours, {layer: LayerHooks(steering={point: (rows, (scale * vector).expand(len(rows), -1))})})
    plain = _ours(ours, {})

    mask = torch.zeros(len(PROMPT), 1)
    mask[rows] = 1.0

    def add(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + scale * vector * mask

    module = hf.model.layers[layer]
    if point == "resid_post":
        handle = module.register_forward_hook(
            lambda _m, _a, out: (add(out[0]), *out[1:]) if isinstance(out, tuple) else add(out)
        )
    else:
        handle = module.register_forward_pre_hook(
            lambda _m, args, kwargs: (
                ((add(args[0]), *args[1:]), kwargs)
                if args
                else (args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])})
            ),
            with_kwargs=True,
        )
    try:
        with torch.inference_mode():
            theirs = hf(torch.tensor([PROMPT])).logits[0]
    finally:
        handle.remove()
    assert (steered - theirs).abs().max().item() <= 1e-4
    assert torch.equal(steered.argmax(-1), theirs.argmax(-1))
    assert (steered - plain).abs().max().item() > 1e-2  # it did something
    assert torch.equal(steered[: rows[0]], plain[: rows[0]])  # rows before the first steered one: untouched


def test_head_ablation_equals_zeroing_the_head_in_transformers(models) -> None:
    hf, ours = models
    layer, head = 2, 1
    heads = ours.config.num_heads
    factors = torch.ones(len(PROMPT), heads)
    factors[:, head] = 0.0
    ablated = _ours(ours, {layer: LayerHooks(head_scales=(_all_rows(), factors))})
    head_dim = ours.config.head_dim

    def zero(_module, args):
        x = args[0].clone()
        x[..., head * head_dim : (head + 1) * head_dim] = 0.0
        return (x,)

    handle = hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero)
    try:
        with torch.inference_mode():
            theirs = hf(torch.tensor([PROMPT])).logits[0]
    finally:
        handle.remove()
    assert (ablated - theirs).abs().max().item() <= 1e-4
    assert (ablated - _ours(ours, {})).abs().max().item() > 1e-3


def test_other_rows_in_the_step_keep_their_bits(models) -> None:
    """Two prompts in one forward; steering and ablating the first leaves the second's logits bit-identical."""
    _, ours = models
    other = [9, 8, 7, 6, 5, 4, 3, 200, 100]
    plain = _ours(ours, {}, [PROMPT, other])
    first = torch.arange(len(PROMPT))
    vector = torch.randn(ours.config.hidden_size, generator=torch.Generator().manual_seed(4)).expand(len(PROMPT), -1)
    factors = torch.zeros(len(PROMPT), ours.config.num_heads)
    hooks = {
        0: LayerHooks(steering={"resid_mid": (first, vector)}, reads={"resid_post": first}),
        1: LayerHooks(head_scales=(first, factors)),
        2: LayerHooks(steering={"resid_pre": (first, vector), "resid_post": (first, vector)}),
    }
    mixed = _ours(ours, hooks, [PROMPT, other])
    assert torch.equal(mixed[len(PROMPT) :], plain[len(PROMPT) :])
    assert not torch.equal(mixed[: len(PROMPT)], plain[: len(PROMPT)])


from attnserve.server.api.inspection import RESIDUAL_POINTS, STEERABLE_POINTS  # noqa: E402


def test_the_doors_name_the_same_points_as_the_model() -> None:
    from attnserve.model.hooks import POINTS, STEERABLE

    assert (POINTS, STEERABLE) == (RESIDUAL_POINTS, STEERABLE_POINTS)
