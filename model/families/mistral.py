"""Mistral: Llama's decoder with a sliding window (7B v0.1: each query sees its last 4,096 positions)."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.families import Family, register, whole_context_window


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"sliding_window": whole_context_window(cfg)}


def _gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    window = meta.get("mistral.attention.sliding_window")
    return {"sliding_window": int(window) if window else None}


FAMILY = register(
    Family(
        "mistral",
        ("MistralForCausalLM",),
        hf_fields=_hf,
        gguf_fields=_gguf,
        gguf_permuted_qk=True,
        needs="a sliding window on every layer (CPU path)",
    )
)
