"""Qwen3 (dense): per-head RMSNorms on q and k before RoPE, no q/k/v bias, head size apart from hidden / heads."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.families import Family, register
from attnserve.model.families.qwen2 import no_layer_windows


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    no_layer_windows(cfg, "qwen3")
    return {"qk_norm": True, "attention_bias": bool(cfg.get("attention_bias", False))}


FAMILY = register(
    Family(
        "qwen3",
        ("Qwen3ForCausalLM",),
        hf_fields=_hf,
        gguf_fields=lambda meta: {"qk_norm": True},
        needs="q/k RMSNorm per head before RoPE",
    )
)
