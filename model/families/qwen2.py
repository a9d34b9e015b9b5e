"""Qwen2 / Qwen2.5: Llama's decoder with a bias on q, k and v."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.errors import ModelLoadError
from attnserve.model.families import Family, register


def no_layer_windows(cfg: Mapping[str, Any], name: str) -> None:
    """Qwen configs carry a ``sliding_window`` that applies only with ``use_sliding_window``, and then
    only to the layers past ``max_window_layers``: refused, not ignored."""
    if cfg.get("use_sliding_window", False):
        raise ModelLoadError(
            f"{name} with use_sliding_window (a window on some layers only) is not supported; "
            "set use_sliding_window to false in config.json to attend to the whole context"
        )


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    no_layer_windows(cfg, "qwen2")
    return {"attention_bias": bool(cfg.get("attention_bias", True))}


FAMILY = register(
    Family(
        "qwen2",
        ("Qwen2ForCausalLM",),
        hf_fields=_hf,
        gguf_fields=lambda meta: {"attention_bias": True},
        needs="q/k/v bias",
    )
)
