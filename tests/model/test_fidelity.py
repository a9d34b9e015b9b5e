"""Our float32 logits match Hugging Face transformers on the same weights (max abs <= 1e-3).

transformers is a test-only dependency: the reference implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnserve.model.loader import LoadedModel, load_model
from attnserve.model.tokenizer import Tokenizer
from tests.helpers import forward_all, save_tiny_hf_model, write_byte_tokenizer

TOLERANCE = 1e-3


def _hf_logits(hf_model, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [hf_model(torch.tensor([p])).logits[0].float() for p in prompts]


def _max_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


# Qwen3: per-head q/k norms, and a head size (32) that is not hidden / heads (16), as in Qwen3 itself.
_FAMILY_OVERRIDES: dict[str, dict[str, object]] = {
    "qwen3": {"head_dim": 32},
    # Phi-3: fused qkv_proj and gate_up_proj in the checkpoint; Phi-4-mini's partial rotary (3/4 of
    # each head) and LongRoPE with a 16-token original context, so the prompts cross into the long factors.
    "phi3": {
        "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 16,
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.3, 1.7, 2.0, 2.5, 3.0],
            "long_factor": [1.5, 2.0, 4.0, 6.0, 8.0, 9.0],
        },
        "pad_token_id": 0,
        "eos_token_id": 2,
    },
}


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "phi3"])
def test_tiny_random_hf_folder_matches_transformers(tmp_path: Path, architecture: str) -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    overrides = {"initializer_range": 0.1, "tie_word_embeddings": False, **_FAMILY_OVERRIDES.get(architecture, {})}
    hf_model = save_tiny_hf_model(tmp_path, architecture, **overrides)
    if architecture == "qwen3":  # random norm weights, or a norm that ignores them would still pass
        with torch.no_grad():
            for name, param in hf_model.named_parameters():
                if "q_norm" in name or "k_norm" in name:
                    param.uniform_(0.5, 1.5)
        hf_model.save_pretrained(tmp_path, safe_serialization=True)
    Tokenizer.byte_level(384).backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    )

    ours = load_model(tmp_path, dtype=torch.float32)
    assert ours.config.architecture == architecture
    assert ours.config.attention_bias == (architecture == "qwen2")
    assert ours.config.qk_norm == (architecture == "qwen3")
    gen = torch.Generator().manual_seed(0)
    # Phi-3's LongRoPE: within its original context (the long factors are checked on the tables below).
    lengths = (3, 10, 16) if architecture == "phi3" else (3, 17, 40)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]
    diff = _max_diff(forward_all(ours.model, prompts, block_size=16), _hf_logits(hf_model, prompts))
    print(f"tiny {architecture} max |logit diff| vs transformers: {diff:.2e}")
    assert diff <= TOLERANCE


def test_longrope_tables_match_transformers_on_both_sides_of_the_original_context(tmp_path: Path) -> None:
    """Positions before the original context take the short factors, those from it on the long
    ones, each scaled by the attention factor; transformers computes one set per forward, by the
    forward's length, so each side is compared with a forward of its own length."""
    pytest.importorskip("transformers")
    hf_model = save_tiny_hf_model(tmp_path, "phi3", **_FAMILY_OVERRIDES["phi3"])
    write_byte_tokenizer(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    cos, sin = ours.model.rotary(torch.arange(40), torch.float32)  # (40, 1, rope_dim)
    rotary = hf_model.model.rotary_emb
    for length, positions in ((16, slice(0, 16)), (40, slice(16, 40))):
        x = torch.zeros(1, length, 8)
        hf_cos, hf_sin = rotary(x, torch.arange(length)[None])
        torch.testing.assert_close(cos[positions, 0], hf_cos[0, positions], atol=1e-5, rtol=0)
        torch.testing.assert_close(sin[positions, 0], hf_sin[0, positions], atol=1e-5, rtol=0)


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm")
def test_default_gguf_matches_transformers(default_gguf: Path, smollm_f32: LoadedModel) -> None:
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()
    tok = smollm_f32.tokenizer
    texts = [
        "Hi",
        "The quick brown fox jumps over the lazy dog.",
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
    ]
    prompts = [tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    diff = _max_diff(forward_all(smollm_f32.model, prompts, block_size=16), _hf_logits(hf_model, prompts))
    print(f"SmolLM2-135M GGUF max |logit diff| vs transformers: {diff:.2e}")
    assert diff <= TOLERANCE
