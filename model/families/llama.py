"""Llama 2/3 (SmolLM2, TinyLlama, ...): the plain decoder, RMSNorm, SwiGLU, RoPE (llama3 scaling)."""

from attnserve.model.families import Family, register


def _gguf(meta: dict) -> dict:
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
