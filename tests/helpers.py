"""Shared test helpers: run the model over a flattened batch with a fresh paged cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.kv_cache import KVCache
from attnserve.model.llama import LlamaForCausalLM


def scattered_block_tables(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Block tables that interleave sequences' blocks (and skip block 0) so paging is really exercised."""
    needs = [-(-n // block_size) for n in lengths]
    tables: list[list[int]] = [[] for _ in lengths]
    next_block = 1
    for round_ in range(max(needs)):
        for i, need in enumerate(needs):
            if round_ < need:
                tables[i].append(next_block)
                next_block += 1
    return tables


def new_cache(model: LlamaForCausalLM, tables: Sequence[Sequence[int]], block_size: int) -> KVCache:
    num_blocks = 1 + max(b for t in tables for b in t)
    return KVCache.allocate(
        model.config, num_blocks=num_blocks, block_size=block_size, dtype=model.dtype, device=model.device
    )


@torch.inference_mode()
def forward_all(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], block_size: int = 16) -> list[torch.Tensor]:
    """Full-prompt logits (len_i, V) of several prompts computed in ONE flattened forward."""
    lengths = [len(p) for p in prompts]
    tables = scattered_block_tables(lengths, block_size)
    cache = new_cache(model, tables, block_size)
    meta = AttentionMetadata.build(block_tables=tables, seq_lens=lengths, query_lens=lengths, block_size=block_size)
    ids = torch.tensor([t for p in prompts for t in p])
    logits = model(ids, meta.positions, cache, meta)
    return list(logits.split(lengths))


TINY_HF_SHAPE = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)


def save_tiny_hf_model(folder: Path, architecture: str = "llama", **overrides: object) -> Any:
    """A random tiny transformers model saved as an HF folder (safetensors); returns the model.
    The tokenizer is the caller's to write."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    config_class, model_class = (getattr(transformers, name) for name in classes[architecture])
    hf_model = model_class(config_class(**{**TINY_HF_SHAPE, **overrides}))
    hf_model = hf_model.float().eval()
    hf_model.save_pretrained(folder, safe_serialization=True)
    return hf_model
