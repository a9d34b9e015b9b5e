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


def sliding_pattern(meta: Mapping[str, Any], arch: str, num_layers: int, every: int) -> tuple[bool, ...]:
    """Which layers slide, as llama.cpp's ``load_swa_pattern`` reads them: a per-layer array in
    ``{arch}.attention.sliding_window_pattern``, or a period n there (the family's otherwise) where
    the last layer of each n is full; n = 0: every layer slides."""
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", every)
    if isinstance(pattern, list | tuple):
        if len(pattern) != num_layers:
            key = f"{arch}.attention.sliding_window_pattern"
            raise ModelLoadError(f"{key} has {len(pattern)} entries for {num_layers} layers")
        return tuple(bool(p) for p in pattern)
    n = int(pattern)
    return tuple(n == 0 or i % n < n - 1 for i in range(num_layers))


def gemma_gguf_fields(
    meta: Mapping[str, Any], arch: str, *, every: int, default_window: int | None, big_layers: int
) -> dict[str, Any]:
    """What Gemma 2 and 3 GGUFs share. The file carries no query_pre_attn_scalar: llama.cpp uses
    head_dim, or hidden / heads for the 27B (known by its layer count), which is what those
    checkpoints set; we do the same."""
    layers = int(meta[f"{arch}.block_count"])
    hidden, heads = int(meta[f"{arch}.embedding_length"]), int(meta[f"{arch}.attention.head_count"])
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    window = meta.get(f"{arch}.attention.sliding_window", default_window)
    context = int(meta.get(f"{arch}.context_length", 0))
    window = int(window) if window and int(window) < context else None  # one as long as the context is none
    return {
        "hidden_act": "gelu_tanh",
        "norm_offset": 1.0,  # the stored (1 + w) has 1 taken off at load (Family.gguf_norm_shift)
        "scale_embeddings": True,
        "sandwich_norms": True,
        "attention_scale": float(hidden // heads if layers == big_layers else head_dim) ** -0.5,
        "final_logit_softcap": meta.get(f"{arch}.final_logit_softcapping") or None,
        "sliding_window": window,
        "sliding_layers": sliding_pattern(meta, arch, layers, every) if window else None,
    }


# llama.cpp's names of Gemma's four block norms (gguf-py tensor_mapping.py): ffn_norm is the MLP's
# input norm, as in Llama, but post_attention_layernorm is the attention output's own.
GEMMA_TENSOR_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    fields = gemma_gguf_fields(meta, "gemma2", every=2, default_window=4096, big_layers=46)
    return fields | {"attn_logit_softcap": meta.get("gemma2.attn_logit_softcapping") or None}


FAMILY = register(
    Family(
        "gemma2",
        ("Gemma2ForCausalLM",),
        hf_fields=lambda cfg: gemma_fields(cfg, "gemma2", full_every=2),
        gguf_fields=_gguf,
        gguf_tensor_names=GEMMA_TENSOR_NAMES,
        gguf_norm_shift=1.0,
        needs="GeGLU, (1 + w) sandwich norms, scaled embeddings, query_pre_attn_scalar, logit soft-caps, "
        "alternating sliding / full layers (CPU path)",
    )
)
