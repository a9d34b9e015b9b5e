"""Per family, fp32 logits within 1e-4 of transformers for the prefill and for 32 cached decode steps.

Ours: two sequences in one flattened batch over the paged cache (block size 4, blocks interleaved),
prefill and then one token each per step, reading their history through their block tables.
Transformers: each sequence with its own cache (``cache``), the same tokens fed (each
step's greedy token by transformers). The decode steps run past the windowed families' window (8),
and Phi-3's past its LongRoPE original context (16): a cached transformers forward takes the long
factors from position 16 on, as ours does per position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.loader import load_model
from tests.helpers import new_cache, save_tiny_hf_model, scattered_block_tables, write_byte_tokenizer
from tests.model.test_fidelity import _FAMILY_OVERRIDES
from tests.model.test_moe import FAMILIES as MOE_FAMILIES

WINDOW = 8
_LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
_GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW, "layer_types": _LAYERS}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {},
    **{name: _FAMILY_OVERRIDES[name] for name in ("qwen3", "phi3")},
    "gemma2": {**_GEMMA, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    "gemma3": {
        **_GEMMA,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    **MOE_FAMILIES,
}
PROMPT_LENGTHS = (5, 12)  # within Phi-3's 16-token original context: a prefill there is per position too
NUM_STEPS = 32
BLOCK_SIZE = 4


def _transformers_steps(hf: Any, prompt: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    """Logits of the prefill (len, V) and of each cached decode step (V,), and the tokens fed."""
    with torch.inference_mode():
        out = hf(torch.tensor([prompt]), use_cache=True)
        logits, cache, fed = [out.logits[0].float()], out.past_key_values, []
        for _ in range(NUM_STEPS):
            fed.append(int(logits[-1][-1].argmax()))
            out = hf(torch.tensor([[fed[-1]]]), cache=cache, use_cache=True)
            logits.append(out.logits[0].float())
            cache = out.past_key_values
    return logits, fed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_and_32_cached_decode_steps_match_transformers(tmp_path: Path, family: str) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = save_tiny_hf_model(tmp_path, family, initializer_range=0.1, **FAMILIES[family])
    write_byte_tokenizer(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32).model
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    reference = [_transformers_steps(hf, p) for p in prompts]

    tables = scattered_block_tables([n + NUM_STEPS for n in PROMPT_LENGTHS], BLOCK_SIZE)
    cache = new_cache(model, tables, BLOCK_SIZE)
    seq_lens, new_tokens = [0, 0], [list(p) for p in prompts]
    worst = {"prefill": 0.0, "decode": 0.0}
    with torch.inference_mode():
        for step in range(NUM_STEPS + 1):
            query_lens = [len(t) for t in new_tokens]
            seq_lens = [n + q for n, q in zip(seq_lens, query_lens, strict=True)]
            meta = AttentionMetadata.build(
                block_tables=tables, seq_lens=seq_lens, query_lens=query_lens, block_size=BLOCK_SIZE
            )
            ids = torch.tensor([t for n in new_tokens for t in n])
            ours = model(ids, meta.positions, cache, meta).split(query_lens)
            kind = "decode" if step else "prefill"
            for i, (logits, _) in enumerate(reference):
                worst[kind] = max(worst[kind], (ours[i] - logits[step]).abs().max().item())
            if step < NUM_STEPS:
                new_tokens = [[fed[step]] for _, fed in reference]
    print(f"{family} fp32 vs transformers: prefill {worst['prefill']:.1e}, 32 decode steps {worst['decode']:.1e}")
    assert worst["prefill"] <= 1e-4 and worst["decode"] <= 1e-4, worst
