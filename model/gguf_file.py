"""Reading GGUF files: metadata, and tensors dequantised to float32 under HF names.

Quantised blocks are dequantised at load with the ``gguf`` library. llama.cpp's
converter permutes the rows of the Q and K projections of Llama-family models
(to suit its interleaved RoPE); we undo that, since our RoPE rotates halves. The
names are llama.cpp's (gguf-py ``constants.py`` / ``tensor_mapping.py``); where a
family departs from Llama's (Gemma's norms, Phi-3's fused projections) its
``Family.gguf_tensor_names`` says so. Experts come merged (``ffn_{gate,up,down}_exps``,
3-D, what llama.cpp writes today) or one matrix each (``ffn_gate.E``, older files).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
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
    "ffn_gate_inp": "mlp.gate",  # the MoE router
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_PER_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
# Merged experts (E, rows, cols) in torch order: down and [gate; up] are our layout whole; gate and
# up alone are split into one matrix per expert, each filling its half of our [gate; up].
_WHOLE_EXPERTS = {"ffn_down_exps": "mlp.experts.down_proj", "ffn_gate_up_exps": "mlp.experts.gate_up_proj"}
_SPLIT_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj"}
_LONGROPE = ("rope_factors_short.weight", "rope_factors_long.weight")  # read into the config, not weights


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
        config = ModelConfig.from_gguf_metadata(self.metadata, name=self.path.stem, longrope_factors=self._longrope())
        if self.metadata.get("general.name"):
            config = config.replace(aliases=(str(self.metadata["general.name"]),))
        # llama.cpp omits output.weight when the head is tied to the embedding.
        return config.replace(tie_word_embeddings="output.weight" not in self.tensor_names)

    def _longrope(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Phi-3's LongRoPE (short, long) factors, which llama.cpp stores as tensors."""
        found = {t.name: t for t in self._reader.tensors if t.name in _LONGROPE}
        if len(found) != 2:
            return None
        short, long = (tuple(float(f) for f in np.asarray(found[n].data, dtype=np.float32)) for n in _LONGROPE)
        return short, long

    def weights(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 tensor) pairs, Q/K permutation undone, Gemma's norm shift taken off."""
        from gguf.quants import dequantize

        family = families.REGISTRY[config.architecture]
        for tensor in self._reader.tensors:
            if tensor.name in _LONGROPE:
                continue
            hf_name = _hf_name(tensor.name, family.gguf_tensor_names)
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
            if family.gguf_permuted_qk:
                if hf_name.endswith("q_proj.weight"):
                    value = unpermute_rows(value, config.num_heads)
                elif hf_name.endswith("k_proj.weight"):
                    value = unpermute_rows(value, config.num_kv_heads)
            if family.gguf_norm_shift and tensor.name.endswith("norm.weight"):
                # Exact in float32: the stored 1 + w lies in [0.5, 2] for any sane w (Sterbenz).
                value -= family.gguf_norm_shift
            if "{expert}" in hf_name:  # merged gate or up experts: one matrix per expert
                for expert in range(value.shape[0]):
                    yield hf_name.format(expert=expert), value[expert]
            else:
                yield hf_name, value


def _hf_name(name: str, overrides: Mapping[str, str]) -> str | None:
    """The HF name of a GGUF tensor; merged gate / up experts get an ``{expert}`` placeholder."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if match := _PER_EXPERT.match(name):
        index, part, expert = match.groups()
        return f"model.layers.{index}.mlp.experts.{expert}.{part}_proj.weight"
    match = _BLOCK.match(name)
    if match is None:
        return None
    index, part, kind = match.groups()
    if part in _WHOLE_EXPERTS and kind == "weight":
        return f"model.layers.{index}.{_WHOLE_EXPERTS[part]}"
    if part in _SPLIT_EXPERTS and kind == "weight":
        return f"model.layers.{index}.mlp.experts.{{expert}}.{_SPLIT_EXPERTS[part]}.weight"
    module = overrides.get(part) or _BLOCK_NAMES.get(part)
    return None if module is None else f"model.layers.{index}.{module}.{kind}"


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's ``permute``: rows (h, D/2, 2) back to the HF order (h, 2, D/2)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
