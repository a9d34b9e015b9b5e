"""Qwen3-MoE: Qwen3's attention (q/k norms), a mixture-of-experts MLP renormalised only with norm_topk_prob."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.errors import ModelLoadError
from attnserve.model.families import Family, gguf_moe_fields, register
from attnserve.model.families.mixtral import moe_fields
from attnserve.model.families.qwen2 import no_layer_windows


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    no_layer_windows(cfg, "qwen3_moe")
    if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
        raise ModelLoadError(
            "qwen3_moe with dense layers (decoder_sparse_step != 1 or mlp_only_layers) is not supported"
        )
    return moe_fields(cfg, normalize=bool(cfg.get("norm_topk_prob", False))) | {"qk_norm": True}


def _gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    # llama.cpp renormalises Qwen3-MoE's top-k weights whatever the config said (models/qwen3moe.cpp:
    # build_moe_ffn(..., norm_w=true)); expert_weights_norm, where a file has it, decides.
    return gguf_moe_fields(meta, "qwen3moe", normalize=True) | {"qk_norm": True}


FAMILY = register(
    Family(
        "qwen3_moe",
        ("Qwen3MoeForCausalLM",),
        hf_fields=_hf,
        gguf_fields=_gguf,
        gguf_architectures=("qwen3moe",),
        needs="Qwen3's attention, router + top-k experts",
    )
)
