"""Batch invariance on the real default model, float32 and bfloat16 (CPU), whatever the CPU's flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnserve.model.loader import load_model
from attnserve.server.engine.request import SamplingParams
from tests.server.engine_utils import make_engine, run_alone, run_together

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 7?",
    "Who wrote Hamlet?",
    "Describe a cat in one sentence.",
    "What is photosynthesis?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Translate 'hello' into Spanish.",
    "What is the largest planet?",
    "Write a haiku about autumn.",
    "What does CPU stand for?",
    "Name a famous painter.",
    "What is the square root of 81?",
    "Why is the sky blue?",
    "What is an atom?",
    "List two programming languages.",
    "What is the opposite of cold?",
    "How do bees make honey?",
    "What is the speed of light?",
    "Who was Albert Einstein?",
    "What is a noun?",
    "Explain gravity briefly.",
    "What is the tallest mountain?",
    "Name a fruit that is yellow.",
    "What is democracy?",
    "How many days in a year?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?",
    "What is a prime number?",
    "Tell me a fun fact about octopuses.",
]


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_batch_invariance_default_model(default_gguf: Path, dtype: torch.dtype) -> None:
    """32 chat prompts x 48 greedy tokens: all at once, then one by one. A 64-token budget chunks
    the prompts differently in the two runs, and the alone run reads the chat template's
    shared prefix from the prefix cache."""
    loaded = load_model(default_gguf, dtype=dtype)
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    assert len(prompts) == 32
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    engine = make_engine(loaded, kv_cache_memory=512 << 20, max_num_batched_tokens=64)
    try:
        together = run_together(engine, prompts, params)
        engine.block_manager.reset_prefix_cache()
        alone = run_alone(engine, prompts, params)
        assert engine.block_manager.num_prefix_hits > 0
    finally:
        engine.shutdown(5)
    assert all(len(o.token_ids) == 48 for o in together)
    mismatched = [
        QUESTIONS[i] for i, (a, b) in enumerate(zip(together, alone, strict=True)) if a.token_ids != b.token_ids
    ]
    assert not mismatched, f"{len(mismatched)} of 32 differ between batched and solo: {mismatched[:3]}"
    assert "Paris" in together[0].text
