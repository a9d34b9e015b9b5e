"""Mixtral: Llama's attention, a mixture-of-experts MLP (softmax router, top-2, renormalised)."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.families import Family, register, whole_context_window


def moe_fields(cfg: Mapping[str, Any], *, normalize: bool) -> dict[str, Any]:
    return {
        "num_experts": int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0),
        "num_experts_per_tok": int(cfg.get("num_experts_per_tok", 2)),
        "moe_intermediate_size": cfg.get("moe_intermediate_size"),
        "norm_topk_prob": normalize,
    }


def _hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return moe_fields(cfg, normalize=True) | {"sliding_window": whole_context_window(cfg)}


FAMILY = register(
    Family(
        "mixtral",
        ("MixtralForCausalLM",),
        hf_fields=_hf,
        # llama.cpp writes Mixtral as architecture "llama" with an expert count: the llama family
        # hands such files over (model/families/llama.py); Q/K rows permuted as Llama's.
        gguf_permuted_qk=True,
        needs="router + top-k experts (grouped GEMMs), fused or per-expert checkpoints",
    )
)
