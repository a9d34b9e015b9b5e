"""Reading GGUF files: metadata, and tensors dequantised to float32 under HF names.

Quantised blocks are dequantised at load with the ``gguf`` library. llama.cpp's
converter permutes the rows of the Q and K projections of Llama-family models
(to suit its interleaved RoPE); we undo that, since our RoPE rotates halves.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnserve.model import families
from attnserve.model.config import ModelConfig
from attnserve.model.errors import ModelLoadError

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFFile:
    """An opened GGUF file (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        import gguf

        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as exc:  # the reader raises ValueError, struct.error, IndexError, ... on junk
            raise ModelLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
        self.path = path
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as exc:
                raise ModelLoadError(f"{path}: metadata field {key} is corrupt ({exc})") from exc
        self.tensor_names = [t.name for t in self._reader.tensors]

    def model_config(self) -> ModelConfig:
        # The file's stem names the model (what a client sends as `model`): general.name is free
        # text ("Smollm2 135M 8k Lc100K Mix1 Ep2"), kept as an alias.
        config = ModelConfig.from_gguf_metadata(self.metadata, name=self.path.stem)
        if self.metadata.get("general.name"):
            config = config.replace(aliases=(str(self.metadata["general.name"]),))
        # llama.cpp omits output.weight when the head is tied to the embedding.
        return config.replace(tie_word_embeddings="output.weight" not in self.tensor_names)

    def weights(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 tensor) pairs, Q/K permutation undone."""
        from gguf.quants import dequantize

        for tensor in self._reader.tensors:
            hf_name = _hf_name(tensor.name)
            if hf_name is None:
                raise ModelLoadError(f"{self.path}: unexpected tensor {tensor.name} for a {config.architecture} model")
            qtype = tensor.tensor_type.name
            if qtype not in SUPPORTED_TENSOR_TYPES:
                raise ModelLoadError(
                    f"{self.path}: tensor {tensor.name} is {qtype}; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
                )
            shape = tuple(int(d) for d in reversed(tensor.shape))  # GGML lists the fastest axis first
            # A copy: F32 tensors come back as read-only views of the memory map.
            array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
            value = torch.from_numpy(array)
            if families.REGISTRY[config.architecture].gguf_permuted_qk:
                if hf_name.endswith("q_proj.weight"):
                    value = unpermute_rows(value, config.num_heads)
                elif hf_name.endswith("k_proj.weight"):
                    value = unpermute_rows(value, config.num_kv_heads)
            yield hf_name, value


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK.match(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    index, part, kind = match.groups()
    return f"model.layers.{index}.{_BLOCK_NAMES[part]}.{kind}"


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's ``permute``: rows (h, D/2, 2) back to the HF order (h, 2, D/2)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
