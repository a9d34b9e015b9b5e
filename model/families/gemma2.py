"""Gemma 2: GeGLU, (1 + w) RMSNorms before and after attention and MLP, embeddings times sqrt(hidden),
query_pre_attn_scalar, attention and final logit soft-capping, sliding and full layers alternating."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.errors import ModelLoadError
from attnserve.model.families import Family, register, whole_context_window


def gemma_fields(cfg: Mapping[str, Any], name: str, full_every: int) -> dict[str, Any]:
    """What Gemma 2 and 3 share; ``layer_types`` (or every ``full_every``-th layer full) marks the
    sliding layers."""
    layers = int(cfg["num_hidden_layers"])
    layer_types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(layers)
    ]
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"{name}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
    return {
        "hidden_act": "gelu_tanh",
        "norm_offset": 1.0,
        "scale_embeddings": True,
        "sandwich_norms": True,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "attention_scale": float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256) ** -0.5,
        "attn_logit_softcap": cfg.get("attn_logit_softcapping"),
        "final_logit_softcap": cfg.get("final_logit_softcapping"),
        "sliding_window": whole_context_window(cfg),
        "sliding_layers": tuple(t == "sliding_attention" for t in layer_types),
    }


FAMILY = register(
    Family(
        "gemma2",
        ("Gemma2ForCausalLM",),
        hf_fields=lambda cfg: gemma_fields(cfg, "gemma2", full_every=2),
        needs="GeGLU, (1 + w) sandwich norms, scaled embeddings, query_pre_attn_scalar, logit soft-caps, "
        "alternating sliding / full layers (CPU path)",
    )
)
