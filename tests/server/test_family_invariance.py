"""Every family keeps batch invariance: 16 prompts, each alone and among the 15 others, in float32
and bfloat16, chunked by a small token budget (windows, soft-caps, q/k norms, partial rotary and
experts all run inside the same row-exact step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from attnserve.model.loader import load_model
from attnserve.server.engine.request import SamplingParams
from tests.helpers import save_tiny_hf_model, write_byte_tokenizer
from tests.server.engine_utils import make_engine, run_alone, run_together

pytestmark = pytest.mark.slow  # 12 pairs of engines, about a minute

_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
FAMILIES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 8},
    "qwen3": {"head_dim": 32},
    "gemma2": {"head_dim": 16, "sliding_window": 8, "layer_types": _LAYERS, "attn_logit_softcapping": 5.0},
    "gemma3": {"head_dim": 16, "sliding_window": 8, "layer_types": _LAYERS},
    "phi3": {"partial_rotary_factor": 0.75, "pad_token_id": 0, "eos_token_id": 2},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48},
    "qwen3_moe": {"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 40, "head_dim": 16},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_16_prompts_alone_and_among_15_others(tmp_path: Path, family: str, dtype: torch.dtype) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    save_tiny_hf_model(tmp_path, family, initializer_range=0.1, **FAMILIES[family])
    write_byte_tokenizer(tmp_path)
    loaded = load_model(tmp_path, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    prompts = [
        torch.randint(3, 384, (int(n),), generator=gen).tolist() for n in torch.randint(3, 40, (16,), generator=gen)
    ]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    together_engine = make_engine(loaded, max_num_batched_tokens=20, block_size=4)
    alone_engine = make_engine(loaded, max_num_batched_tokens=20, block_size=4)
    try:
        together = run_together(together_engine, prompts, params)
        alone = run_alone(alone_engine, prompts, params)
    finally:
        together_engine.shutdown(5)
        alone_engine.shutdown(5)
    differ = [i for i, (t, a) in enumerate(zip(together, alone, strict=True)) if t.token_ids != a.token_ids]
    assert not differ, f"{family} {dtype}: requests {differ} differ between batched and alone"
