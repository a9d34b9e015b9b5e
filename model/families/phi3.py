"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj in the checkpoint (loaded whole),
partial rotary (Phi-4-mini: 3/4 of each head), LongRoPE (see model/rope.py)."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.families import Family, register, whole_context_window


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"sliding_window": whole_context_window(cfg)}


FAMILY = register(
    Family(
        "phi3",
        ("Phi3ForCausalLM",),
        hf_fields=_hf,
        needs="fused projections, partial rotary, LongRoPE short / long factors",
    )
)
