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
from tests.helpers import forward_all, save_tiny_hf_model

TOLERANCE = 1e-3


def _hf_logits(hf_model, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [hf_model(torch.tensor([p])).logits[0].float() for p in prompts]


def _max_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


# Qwen3: per-head q/k norms, and a head size (32) that is not hidden / heads (16), as in Qwen3 itself.
_FAMILY_OVERRIDES: dict[str, dict[str, object]] = {"qwen3": {"head_dim": 32}}


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
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
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    diff = _max_diff(forward_all(ours.model, prompts, block_size=16), _hf_logits(hf_model, prompts))
    print(f"tiny {architecture} max |logit diff| vs transformers: {diff:.2e}")
    assert diff <= TOLERANCE


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
