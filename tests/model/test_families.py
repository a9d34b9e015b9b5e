"""Gemma 2 and Gemma 3 (text) against transformers (eager attention) on tiny random models.

What each family changes is what is tested: GeGLU, (1 + w) RMSNorms before and after both
blocks, embeddings scaled by sqrt(hidden), query_pre_attn_scalar, attention and final logit
soft-capping (Gemma 2), q/k norms and a second RoPE base for the sliding layers (Gemma 3),
sliding and full layers mixed. Prompts run past the window; greedy tokens go through the engine
in chunks smaller than the window; attention rows are the soft-capped, windowed weights.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch

from attnserve.model.loader import LoadedModel, load_model
from attnserve.server.engine.request import AttentionOptions, HeadReduction, SamplingParams, WeightsDtype
from tests.helpers import forward_all, save_tiny_hf_model, write_byte_tokenizer
from tests.server.engine_utils import make_engine

WINDOW = 8
FAMILIES: dict[str, dict[str, Any]] = {
    "gemma2": {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    "gemma3": {
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        }
    },
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LoadedModel]:
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    overrides = {
        "head_dim": 16,
        "query_pre_attn_scalar": 24,  # not head_dim: the scale must come from it
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "initializer_range": 0.1,
        **FAMILIES[request.param],
    }
    hf = save_tiny_hf_model(folder, request.param, **overrides)
    with torch.no_grad():  # random (1 + w) norms: a norm that ignored its weight would still pass otherwise
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    hf.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder)
    return hf, load_model(folder, dtype=torch.float32)


def prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]


def test_the_config_is_read(family: tuple[Any, LoadedModel]) -> None:
    c = family[1].config
    assert c.sandwich_norms and c.norm_offset == 1.0 and c.scale_embeddings and c.hidden_act == "gelu_tanh"
    assert c.attention_scale == pytest.approx(24**-0.5) and c.sliding_layers == (True, False, True)
    assert make_engine(family[1], start=False).info().layer_windows == (WINDOW, 0, WINDOW)
    assert c.qk_norm == (c.architecture == "gemma3")
    assert (c.attn_logit_softcap, c.final_logit_softcap) == ((5.0, 3.0) if c.architecture == "gemma2" else (None, None))


def test_logits_match_transformers(family: tuple[Any, LoadedModel]) -> None:
    hf, ours = family
    batch = prompts((3, WINDOW + 1, 40))
    with torch.inference_mode():
        reference = [hf(torch.tensor([p])).logits[0].float() for p in batch]
    diff = max((a - b).abs().max().item() for a, b in zip(forward_all(ours.model, batch), reference, strict=True))
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["invariant", "fast-path"])
def test_greedy_tokens_through_the_engine_match_transformers(
    family: tuple[Any, LoadedModel], batch_invariant: bool
) -> None:
    """On the batch-invariant path and on the fast one (--batch-invariant off: windows and soft-caps
    through the explicit weights on CPU, the Triton kernels on CUDA)."""
    hf, ours = family
    engine = make_engine(ours, max_num_batched_tokens=12, block_size=4, batch_invariant=batch_invariant)
    try:
        for prompt in prompts((30, 41), seed=1):
            out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
            ids = list(prompt)
            with torch.inference_mode():
                for _ in range(12):
                    ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            assert out.token_ids == ids[len(prompt) :]
    finally:
        engine.shutdown(5)


def test_attention_rows_are_the_windowed_soft_capped_weights(family: tuple[Any, LoadedModel]) -> None:
    hf, ours = family
    (prompt,) = prompts((20,), seed=2)
    engine = make_engine(ours, max_num_batched_tokens=8, block_size=4)
    try:
        options = AttentionOptions(
            layers=(0, 1), reduction=HeadReduction.NONE, include_prompt=True, dtype=WeightsDtype.FLOAT32
        )
        out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=1, attention=options)))
    finally:
        engine.shutdown(5)
    with torch.inference_mode():
        reference = hf(torch.tensor([prompt]), output_attentions=True).attentions
    assert len(out.attention) == 2 * len(prompt)
    for row in out.attention:
        weights = np.frombuffer(row.weights, dtype="<f4").reshape(row.num_heads, row.context_len)
        if row.layer == 0:  # the sliding layer
            assert not weights[:, : max(0, row.position - WINDOW + 1)].any()
        expected = reference[row.layer][0, :, row.position, : row.position + 1].numpy()
        np.testing.assert_allclose(weights, expected, atol=1e-5)
