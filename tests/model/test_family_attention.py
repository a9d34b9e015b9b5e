"""Attention rows against transformers' eager ``output_attentions``, family by family (fp32, tiny
random models): the weights the engine returns are the ones the architecture computes.

Gemma 2/3 (windows, soft-capping) are checked in test_families.py and Mistral's window in
test_sliding_window.py; here every other family, with prompt rows and a generated token's row.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from attnserve.model.loader import load_model
from attnserve.server.engine.request import AttentionOptions, HeadReduction, SamplingParams, WeightsDtype
from tests.helpers import save_tiny_hf_model, write_byte_tokenizer
from tests.model.test_fidelity import _FAMILY_OVERRIDES
from tests.model.test_moe import FAMILIES as MOE_FAMILIES
from tests.server.engine_utils import make_engine

OVERRIDES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    **{name: _FAMILY_OVERRIDES[name] for name in ("qwen3", "phi3")},
    **MOE_FAMILIES,
}


@pytest.mark.parametrize("architecture", sorted(OVERRIDES))
def test_attention_rows_equal_transformers_eager_weights(tmp_path: Path, architecture: str) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = save_tiny_hf_model(tmp_path, architecture, initializer_range=0.1, **OVERRIDES[architecture])
    write_byte_tokenizer(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    prompt = torch.randint(3, 384, (14,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = make_engine(ours, max_num_batched_tokens=6, block_size=4)  # the prompt in chunks, over blocks
    last = ours.config.num_layers - 1
    options = AttentionOptions(
        layers=(0, last), reduction=HeadReduction.NONE, include_prompt=True, dtype=WeightsDtype.FLOAT32
    )
    try:
        out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=2, ignore_eos=True, attention=options)))
    finally:
        engine.shutdown(5)
    full = prompt + out.token_ids[:1]  # the second token's row sits at the first generated token's position
    with torch.inference_mode():
        reference = hf(torch.tensor([full]), output_attentions=True).attentions
    assert len(out.attention) == 2 * (len(prompt) + 1)
    worst = 0.0
    for row in out.attention:
        weights = np.frombuffer(row.weights, dtype="<f4").reshape(row.num_heads, row.context_len)
        expected = reference[row.layer][0, :, row.position, : row.position + 1].numpy()
        worst = max(worst, float(np.abs(weights - expected).max()))
    print(f"{architecture} attention rows vs transformers eager: max |diff| {worst:.2e}")
    assert worst <= 1e-5
