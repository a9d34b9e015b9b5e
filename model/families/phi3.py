"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj in the checkpoint (loaded whole),
partial rotary (Phi-4-mini: 3/4 of each head), LongRoPE (see model/rope.py)."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.families import Family, register, whole_context_window


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"sliding_window": whole_context_window(cfg)}


def _gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    # The converter writes sliding_window 0 where the config has none (Phi-4-mini). llama.cpp itself
    # ignores Phi's window (models/phi3.cpp); we apply it, as transformers and our HF loader do.
    window = int(meta.get("phi3.attention.sliding_window") or 0)
    return {"sliding_window": window if 0 < window < int(meta.get("phi3.context_length", 0)) else None}


FAMILY = register(
    Family(
        "phi3",
        ("Phi3ForCausalLM",),
        hf_fields=_hf,
        gguf_fields=_gguf,
        # Fused in the file as in the checkpoint: attn_qkv is [q; k; v], ffn_up is [gate; up].
        gguf_tensor_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
        needs="fused projections, partial rotary, LongRoPE short / long factors",
    )
)
