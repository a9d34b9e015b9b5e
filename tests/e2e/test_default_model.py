"""The real default model (SmolLM2-135M-Instruct, GGUF) answers a question correctly."""

from __future__ import annotations

import pytest

from attnserve.model.generate import generate_tokens
from attnserve.model.loader import LoadedModel


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_capital_of_france_is_paris(smollm_f32: LoadedModel) -> None:
    tok = smollm_f32.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    ids = list(generate_tokens(smollm_f32.model, prompt, max_tokens=24, stop_token_ids=tok.eos_token_ids))
    text = tok.decode(ids, skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_loaded_config_matches_the_published_shape(smollm_f32: LoadedModel) -> None:
    c = smollm_f32.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta, c.max_position_embeddings) == (49152, 1536, 1e5, 8192)
    assert c.tie_word_embeddings
