"""Gemma 3 (text): Gemma 2's block without soft-caps, q/k norms, 5:1 sliding:full layers, and a
second RoPE base for the sliding layers."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.families import Family, register, rope_theta
from attnserve.model.families.gemma2 import gemma_fields


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    local = cfg.get("rope_local_base_freq") or rope_theta(cfg, "sliding_attention")
    fields = gemma_fields(cfg, "gemma3", full_every=int(cfg.get("sliding_window_pattern", 6)))
    return fields | {"qk_norm": True, "rope_local_theta": float(local)}


FAMILY = register(
    Family(
        "gemma3",
        ("Gemma3ForCausalLM",),
        hf_fields=_hf,
        hf_model_types=("gemma3_text",),
        needs="Gemma 2's block, q/k norms, 5:1 sliding / full layers with two RoPE bases (CPU path)",
    )
)
