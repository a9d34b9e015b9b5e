"""Mistral with a sliding window: each query sees only the last `sliding_window` positions.

transformers (eager attention) is the reference: logits, greedy tokens through the engine with
prompts longer than the window (chunked, so the window crosses chunk and cache boundaries), and
attention rows that are zero outside the window. Every layer being windowed, the engine gives back
the blocks a request left behind the window: bounded KV, the same tokens and logprobs.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from attnserve.model.attention import causal_mask
from attnserve.model.config import ModelConfig
from attnserve.model.errors import ModelLoadError
from attnserve.model.loader import LoadedModel, load_model
from attnserve.server.engine.core import Engine
from attnserve.server.engine.request import AttentionOptions, HeadReduction, SamplingParams, WeightsDtype
from tests.helpers import forward_all, save_tiny_hf_model, transformers_greedy, write_byte_tokenizer
from tests.server.engine_utils import make_engine, run_together

WINDOW = 8


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, LoadedModel]:
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("mistral")
    torch.manual_seed(0)
    hf = save_tiny_hf_model(folder, "mistral", sliding_window=WINDOW, initializer_range=0.1)
    write_byte_tokenizer(folder)
    return hf, load_model(folder, dtype=torch.float32)


def prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]


def test_the_window_is_read_from_config_json_and_reported(mistral: tuple[object, LoadedModel]) -> None:
    assert mistral[1].config.architecture == "mistral" and mistral[1].config.sliding_window == WINDOW
    engine = make_engine(mistral[1], start=False)
    assert engine.info().layer_windows == (WINDOW,) * mistral[1].config.num_layers  # GetModelInfo, /v1/models/{id}


def test_logits_match_transformers_past_the_window(mistral: tuple[object, LoadedModel]) -> None:
    hf, ours = mistral
    batch = prompts((3, WINDOW + 1, 40))
    with torch.inference_mode():
        reference = [hf(torch.tensor([p])).logits[0].float() for p in batch]  # type: ignore[operator]
    diff = max((a - b).abs().max().item() for a, b in zip(forward_all(ours.model, batch), reference, strict=True))
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["invariant", "fast-path"])
def test_greedy_tokens_through_the_engine_match_transformers(
    mistral: tuple[object, LoadedModel], batch_invariant: bool
) -> None:
    hf, ours = mistral
    # Chunks and blocks smaller than 40; the fast path (--batch-invariant off) honours the window too.
    engine = make_engine(ours, max_num_batched_tokens=12, block_size=4, batch_invariant=batch_invariant)
    try:
        for prompt in prompts((30, 41), seed=1):
            out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
            ids = list(prompt)
            with torch.inference_mode():  # greedy by hand: generate() would hold back EOS, we do not
                for _ in range(12):
                    ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))  # type: ignore[operator]
            assert out.token_ids == ids[len(prompt) :]
    finally:
        engine.shutdown(5)


def test_attention_rows_are_transformers_rows_and_zero_outside_the_window(
    mistral: tuple[object, LoadedModel],
) -> None:
    hf, ours = mistral
    (prompt,) = prompts((20,), seed=2)
    engine = make_engine(ours, max_num_batched_tokens=8, block_size=4)
    try:
        options = AttentionOptions(
            layers=(0, 2), reduction=HeadReduction.NONE, include_prompt=True, dtype=WeightsDtype.FLOAT32
        )
        out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=1, attention=options)))
    finally:
        engine.shutdown(5)
    with torch.inference_mode():
        reference = hf(torch.tensor([prompt]), output_attentions=True).attentions  # type: ignore[operator]
    assert len(out.attention) == 2 * len(prompt)
    for row in out.attention:
        weights = np.frombuffer(row.weights, dtype="<f4").reshape(row.num_heads, row.context_len)
        start = max(0, row.position - WINDOW + 1)
        assert not weights[:, :start].any(), f"layer {row.layer} position {row.position} reads outside the window"
        expected = reference[row.layer][0, :, row.position, : row.position + 1].numpy()
        np.testing.assert_allclose(weights, expected, atol=1e-5)


def test_the_mask_keeps_the_last_window_positions() -> None:
    mask = causal_mask(3, 10, torch.device("cpu"), window=4)  # queries at positions 7, 8, 9
    expected = {0: [4, 5, 6, 7], 1: [5, 6, 7, 8], 2: [6, 7, 8, 9]}
    assert {i: mask[i].nonzero().flatten().tolist() for i in range(3)} == expected


def test_qwen2_windows_on_some_layers_are_refused_not_ignored() -> None:
    base = {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "sliding_window": 32,
    }
    assert ModelConfig.from_hf_config(base).sliding_window is None  # use_sliding_window false: no window
    with pytest.raises(ModelLoadError, match="use_sliding_window"):
        ModelConfig.from_hf_config({**base, "use_sliding_window": True})


def _most_blocks_held(engine: Engine) -> list[int]:
    """Blocks held by requests after each step (appended on the engine's thread)."""
    held: list[int] = []
    manager = engine.block_manager
    usable = manager.num_blocks - (manager.sliding_window is not None)  # the null block is not anyone's
    engine.step_observers.append(lambda _: held.append(usable - manager.num_free_blocks))
    return held


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["invariant", "fast-path"])
def test_blocks_behind_the_window_are_given_back_and_nothing_else_changes(
    mistral: tuple[object, LoadedModel], batch_invariant: bool
) -> None:
    """Two requests generate 200 tokens each, far past the window: given back, the blocks they hold
    stay bounded by the window and a step's chunk; tokens, logprobs and attention rows are bit-identical
    to an engine that keeps every block, and tokens and logprobs equal (within 1e-4) to transformers'
    cached greedy generation."""
    hf, ours = mistral
    batch = prompts((30, 41), seed=3)
    # The generated tokens' attention rows too: the explicit path reads a table whose first entries are
    # the null block by then (and masks them: the rows must be bit-identical, zero outside the window).
    rows = AttentionOptions(layers=(1,), reduction=HeadReduction.NONE, dtype=WeightsDtype.FLOAT32)
    params = SamplingParams(max_tokens=200, ignore_eos=True, logprobs=3, attention=rows)
    runs = {}
    for release in (True, False):
        engine = make_engine(
            ours,
            max_num_batched_tokens=12,
            block_size=4,
            release_out_of_window_blocks=release,
            batch_invariant=batch_invariant,  # the fast path reads whole tables (null block included) and masks
        )
        held = _most_blocks_held(engine)
        try:
            runs[release] = (run_together(engine, batch, params), max(held))
        finally:
            engine.shutdown(5)
    (kept, most_kept), (released, most_released) = runs[False], runs[True]
    print(f"KV blocks held at most (window {WINDOW}, block size 4): {most_released} released, {most_kept} kept")
    # Per request: the window's 8 positions and a 12-token chunk over at most 6 blocks, and the one it fills.
    assert most_released <= 2 * 6, most_released
    assert most_kept >= 100  # nearly (30 + 200) / 4 + (41 + 200) / 4: a request frees its own as it ends
    for a, b in zip(released, kept, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.attention == b.attention
        assert len(a.attention) == 200 and a.attention[-1].context_len > 200
    for prompt, out in zip(batch, released, strict=True):
        tokens, logits = transformers_greedy(hf, prompt, 200)
        assert out.token_ids == tokens
        expected = [float(torch.log_softmax(step, -1)[t]) for step, t in zip(logits, tokens, strict=True)]
        diff = max(abs(got.logprob - want) for got, want in zip(out.logprobs, expected, strict=True))
        assert diff <= 1e-4, diff
