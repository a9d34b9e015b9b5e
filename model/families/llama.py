"""Llama 2/3 (SmolLM2, TinyLlama, ...): the plain decoder, RMSNorm, SwiGLU, RoPE (llama3 scaling)."""

from collections.abc import Mapping
from typing import Any

from attnserve.model.families import Family, gguf_moe_fields, register


def _gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    # llama.cpp converts Mixtral to architecture "llama" with llama.expert_count set (LlamaModel in
    # its converter): such a file is a Mixtral (softmax router, top-k renormalised, build_moe_ffn).
    if int(meta.get("llama.expert_count") or 0) > 0:
        return {"architecture": "mixtral"} | gguf_moe_fields(meta, "llama", normalize=True)
    return {}


FAMILY = register(
    Family(
        "llama",
        ("LlamaForCausalLM",),
        gguf_fields=_gguf,
        gguf_permuted_qk=True,
        needs="the plain decoder; RoPE linear / llama3 scaling",
    )
)
