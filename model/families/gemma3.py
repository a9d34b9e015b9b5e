"""Gemma 3 (text): Gemma 2's block without soft-caps, q/k norms, 5:1 sliding:full layers, and a
second RoPE base for the sliding layers."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.families import Family, register, rope_theta
from attnserve.model.families.gemma2 import GEMMA_TENSOR_NAMES, gemma_fields, gemma_gguf_fields


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    local = cfg.get("rope_local_base_freq") or rope_theta(cfg, "sliding_attention")
    fields = gemma_fields(cfg, "gemma3", full_every=int(cfg.get("sliding_window_pattern", 6)))
    return fields | {"qk_norm": True, "rope_local_theta": float(local)}


def _gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    fields = gemma_gguf_fields(meta, "gemma3", every=6, default_window=None, big_layers=62)
    # llama.cpp's default local base when the file has none (llama-hparams.h), unscaled as here.
    return fields | {"qk_norm": True, "rope_local_theta": float(meta.get("gemma3.rope.freq_base_swa", 10000.0))}


FAMILY = register(
    Family(
        "gemma3",
        ("Gemma3ForCausalLM",),
        hf_fields=_hf,
        hf_model_types=("gemma3_text",),
        gguf_fields=_gguf,
        gguf_tensor_names=GEMMA_TENSOR_NAMES,
        gguf_norm_shift=1.0,
        needs="Gemma 2's block, q/k norms, 5:1 sliding / full layers with two RoPE bases (CPU path)",
    )
)
