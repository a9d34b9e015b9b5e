"""The model families: one module each, registered here by the names checkpoints carry.

A family maps what an HF ``config.json`` (``architectures`` / ``model_type``) or a GGUF
(``general.architecture``) says onto the switches of the one decoder (``ModelConfig`` fields,
``model/llama.py``). Adding a family is one module that calls :func:`register`, plus its tests
against transformers. Architectures no family claims fail at load with the supported list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Fields = Callable[[Mapping[str, Any]], dict[str, Any]]


def _none(_: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.architecture
    hf_architectures: tuple[str, ...]
    hf_fields: Fields = _none  # from config.json: the family's switches
    hf_model_types: tuple[str, ...] = ()  # model_type values that name it (besides `name`)
    gguf_fields: Fields | None = None  # from GGUF metadata; None: no GGUF support
    gguf_architectures: tuple[str, ...] = ()  # general.architecture values that name it (besides `name`)
    gguf_permuted_qk: bool = False  # llama.cpp permutes its Q/K rows (undone at load)
    # llama.cpp's block tensor names where the family departs from Llama's (GGUF part -> HF module).
    gguf_tensor_names: Mapping[str, str] = field(default_factory=dict)
    gguf_norm_shift: float = 0.0  # subtracted from GGUF norm weights (Gemma: the converter adds 1)
    needs: str = ""  # what the family changes, in words (the README's table)


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    REGISTRY[family.name] = family
    return family


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.hf_architectures)})" for f in REGISTRY.values())


def for_hf_config(cfg: Mapping[str, Any]) -> Family:
    archs = cfg.get("architectures") or []
    for family in REGISTRY.values():
        if any(a in family.hf_architectures for a in archs):
            return family
    model_type = cfg.get("model_type", "")
    for family in REGISTRY.values():
        if model_type == family.name or model_type in family.hf_model_types:
            return family
    from attnserve.model.errors import ModelLoadError

    raise ModelLoadError(f"config.json describes {archs or model_type!r}; supported: {supported()}")


def for_gguf(architecture: str) -> Family:
    family = REGISTRY.get(architecture) or next(
        (f for f in REGISTRY.values() if architecture in f.gguf_architectures), None
    )
    if family is None or family.gguf_fields is None:
        from attnserve.model.errors import ModelLoadError

        loadable = ", ".join(
            "/".join((f.name, *f.gguf_architectures)) for f in REGISTRY.values() if f.gguf_fields is not None
        )
        raise ModelLoadError(f"GGUF architecture {architecture!r} is not supported (supported: {loadable})")
    return family


def rope_theta(cfg: Mapping[str, Any], layer_type: str = "full_attention") -> float:
    """``rope_theta``, or transformers 5's ``rope_parameters`` (per layer type where layers differ)."""
    if cfg.get("rope_theta"):
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    params = params.get(layer_type, params)
    return float(params.get("rope_theta", 10000.0))


def whole_context_window(cfg: Mapping[str, Any]) -> int | None:
    """``sliding_window`` when it is shorter than the context (a window as long changes nothing)."""
    window = cfg.get("sliding_window")
    if window is None or int(window) >= int(cfg.get("max_position_embeddings", 2048)):
        return None
    return int(window)


def gguf_moe_fields(meta: Mapping[str, Any], arch: str, *, normalize: bool) -> dict[str, Any]:
    """``{arch}.expert_count`` / ``expert_used_count`` / ``expert_feed_forward_length`` (absent where an
    expert is feed_forward_length wide, as in Mixtral)."""
    size = meta.get(f"{arch}.expert_feed_forward_length")
    return {
        "num_experts": int(meta[f"{arch}.expert_count"]),
        "num_experts_per_tok": int(meta[f"{arch}.expert_used_count"]),
        "moe_intermediate_size": int(size) if size else None,
        "norm_topk_prob": bool(meta.get(f"{arch}.expert_weights_norm", normalize)),
    }


# The families, in the order the README lists them: importing registers them.
from attnserve.model.families import (  # noqa: E402
    gemma2,
    gemma3,
    llama,
    mistral,
    mixtral,
    phi3,
    qwen2,
    qwen3,
    qwen3_moe,
)

__all__ = ["REGISTRY", "Family", "for_gguf", "for_hf_config", "register", "supported"]
_ = (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, mixtral, qwen3_moe)
