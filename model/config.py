"""Model configuration: one frozen dataclass for every Llama-family shape.

Built from a Hugging Face ``config.json``, from GGUF metadata, or by name from
the registry of shapes used for dummy (random) weights in tests and benchmarks.
Validation lives in ``__post_init__`` and does no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnserve.model import families
from attnserve.model.errors import ModelLoadError

# Architectures whose decoder is ours (see model/llama.py), one module each in model/families/.
SUPPORTED_ARCHITECTURES = tuple(families.REGISTRY)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF ``rope_scaling`` (types: linear, llama3, longrope)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope (Phi-3/3.5/4-mini): per-frequency divisors below and from the original context on.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None  # cos and sin scaled by it; None: from the context ratio

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3", "longrope"):
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is not supported (supported: linear, llama3, longrope)"
            )
        if self.rope_type == "longrope" and (not self.short_factor or len(self.short_factor) != len(self.long_factor)):
            raise ValueError("longrope needs short_factor and long_factor of the same length")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """The shape and hyper-parameters of a Llama-family decoder."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rotary_dim: int | None = None  # leading dims of each head that RoPE rotates; None: all (Phi-4-mini: 3/4)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k (its own weights), before RoPE: Qwen3
    # Each query sees only the last ``sliding_window`` positions, its own included (Mistral 7B v0.1),
    # on the layers ``sliding_layers`` marks (None: every layer).
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None
    # Gemma 2 / 3 switches.
    hidden_act: str = "silu"  # the MLP's gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too, and one before the MLP
    attention_scale: float | None = None  # q·k scale; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax
    final_logit_softcap: float | None = None  # the same on the logits
    rope_local_theta: float | None = None  # the RoPE base of the sliding layers (Gemma 3), unscaled
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is num_experts experts, top-k routed.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # an expert's; None: intermediate_size
    norm_topk_prob: bool = True  # the k routing weights renormalised to sum to 1
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = "unnamed"
    aliases: tuple[str, ...] = ()  # other names the checkpoint goes by (a GGUF's general.name)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"RoPE needs an even rotary_dim <= head_dim, got {self.rope_dim} of {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (or None), got {self.sliding_window}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (silu, gelu_tanh)")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be 1..{self.num_experts}, got {self.num_experts_per_tok}")
        for cap in (self.attn_logit_softcap, self.final_logit_softcap):
            if cap is not None and cap <= 0:
                raise ValueError(f"soft-caps must be > 0, got {cap}")

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None where it sees the whole context."""
        if self.sliding_window is None or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return None
        return self.sliding_window

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = (
            3 * h * i
            if not self.num_experts
            else self.num_experts * 3 * h * self.expert_intermediate_size + h * self.num_experts
        )
        per_layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    # ----------------------------------------------------------------- factories
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], *, name: str = "unnamed") -> ModelConfig:
        """Build from the dict of an HF ``config.json``: the fields every family shares, then its own."""
        family = families.for_hf_config(cfg)
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        rope_params = cfg.get("rope_parameters") or {}
        partial = float(cfg.get("partial_rotary_factor") or rope_params.get("partial_rotary_factor") or 1.0)
        shared: dict[str, Any] = {
            "architecture": family.name,
            "vocab_size": int(cfg["vocab_size"]),
            "hidden_size": hidden,
            "intermediate_size": int(cfg["intermediate_size"]),
            "num_layers": int(cfg["num_hidden_layers"]),
            "num_heads": num_heads,
            "num_kv_heads": int(cfg.get("num_key_value_heads") or num_heads),
            "head_dim": head_dim,
            "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048)),
            "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "rotary_dim": None if partial == 1.0 else int(head_dim * partial),
            "rope_theta": families.rope_theta(cfg),
            "rope_scaling": _rope_scaling_from_hf(cfg.get("rope_scaling") or _full_rope_parameters(cfg), cfg),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "attention_bias": bool(cfg.get("attention_bias", False)),
            "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_ids": eos_ids,
            "name": name,
        }
        return cls(**(shared | family.hf_fields(cfg)))

    @classmethod
    def from_hf_folder(cls, folder: Path) -> ModelConfig:
        path = folder / "config.json"
        if not path.is_file():
            raise ModelLoadError(
                f"{folder} has no config.json: point --model at a Hugging Face model folder or a .gguf file"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
        try:
            return cls.from_hf_config(data, name=folder.name)
        except KeyError as exc:
            raise ModelLoadError(f"{path} lacks the field {exc}") from exc

    @classmethod
    def from_gguf_metadata(
        cls,
        meta: Mapping[str, Any],
        *,
        name: str = "unnamed",
        longrope_factors: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> ModelConfig:
        """Build from GGUF key/value metadata (already decoded to Python values). ``longrope_factors``:
        (short, long), which llama.cpp keeps as tensors (``rope_factors_short/long``), not metadata."""
        arch = str(meta.get("general.architecture"))
        family = families.for_gguf(arch)
        assert family.gguf_fields is not None

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        num_heads = int(get("attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // num_heads)
        context = int(get("context_length"))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
        if not vocab:
            raise ModelLoadError("GGUF metadata has neither a vocab_size nor a token list")
        scaling = None
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
        elif scaling_type == "longrope" or (scaling_type is None and longrope_factors):
            if not longrope_factors:
                raise ModelLoadError("GGUF says longrope but has no rope_factors_short / rope_factors_long tensors")
            original = int(get("rope.scaling.original_context_length"))
            attn_factor = meta.get(f"{arch}.rope.scaling.attn_factor")
            try:
                scaling = RopeScaling(
                    "longrope",
                    factor=context / original,
                    original_max_position_embeddings=original,
                    short_factor=longrope_factors[0],
                    long_factor=longrope_factors[1],
                    attention_factor=None if attn_factor is None else float(attn_factor),
                )
            except ValueError as exc:
                raise ModelLoadError(str(exc)) from exc
        elif scaling_type not in (None, "none"):
            raise ModelLoadError(f"GGUF rope scaling {scaling_type!r} is not supported (supported: linear, longrope)")
        # Partial rotary (Phi-4-mini): llama.cpp's n_rot; every converter writes it or leaves it to head_dim.
        rotary = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        shared: dict[str, Any] = {
            "architecture": family.name,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(get("feed_forward_length")),
            "num_layers": int(get("block_count")),
            "num_heads": num_heads,
            "num_kv_heads": int(get("attention.head_count_kv", num_heads)),
            "head_dim": head_dim,
            "max_position_embeddings": context,
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(get("rope.freq_base", 10000.0)),
            "rope_scaling": scaling,
            "rotary_dim": None if rotary == head_dim else rotary,
            "tie_word_embeddings": False,  # decided by the loader: tied when output.weight is absent
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_ids": (int(eos),) if eos is not None else (),
            "name": name,
        }
        return cls(**(shared | family.gguf_fields(meta)))


def _full_rope_parameters(cfg: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """transformers 5's scaling of the full-attention layers, in the old ``rope_scaling`` shape."""
    params = cfg.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    if params.get("rope_type", "default") == "default":
        return None
    return params


def _rope_scaling_from_hf(raw: Mapping[str, Any] | None, cfg: Mapping[str, Any] | None = None) -> RopeScaling | None:
    if not raw:
        return None
    rope_type = raw.get("rope_type") or raw.get("type")
    if rope_type in (None, "default"):
        return None
    cfg = cfg or {}
    original = raw.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or 8192
    factor = raw.get("factor")
    if factor is None and rope_type == "longrope":  # Phi-3: the ratio of the extended to the original context
        factor = int(cfg.get("max_position_embeddings", original)) / int(original)
    try:
        return RopeScaling(
            rope_type=rope_type,
            factor=float(factor if factor is not None else 1.0),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original),
            short_factor=tuple(float(f) for f in raw.get("short_factor") or ()),
            long_factor=tuple(float(f) for f in raw.get("long_factor") or ()),
            attention_factor=None if raw.get("attention_factor") is None else float(raw["attention_factor"]),
        )
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


# Named shapes for dummy weights. `tiny` is the test model: small enough that a
# forward is milliseconds on CPU, but with GQA, several layers and an odd head count.
NAMED_CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="llama",
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="tiny",
    ),
    # The default model's widths (so the linears and attention take the kernels a real model
    # takes) with two layers and a small vocabulary: the batch-invariance tests' model.
    "tiny-wide": ModelConfig(
        architecture="llama",
        vocab_size=512,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=2,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position_embeddings=1024,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="tiny-wide",
    ),
    "smollm2-135m": ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
        name="smollm2-135m",
    ),
    "llama-3.2-1b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            "llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
        name="llama-3.2-1b",
    ),
    "llama-3-8b": ModelConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
        name="llama-3-8b",
    ),
}

# The other families at real widths, for benchmarks and GPU runs (random weights; fewer layers
# than the real models where noted, so that they fit a CPU machine's memory).
NAMED_CONFIGS |= {
    "qwen3-8b": NAMED_CONFIGS["llama-3-8b"].replace(
        architecture="qwen3",
        num_layers=36,
        vocab_size=151936,
        intermediate_size=12288,
        rope_theta=1e6,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        qk_norm=True,
        name="qwen3-8b",
    ),
    "gemma-3-4b": ModelConfig(
        architecture="gemma3",
        vocab_size=262208,
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        rope_scaling=RopeScaling("linear", factor=8.0),
        tie_word_embeddings=True,
        qk_norm=True,
        sliding_window=1024,
        sliding_layers=tuple((i + 1) % 6 != 0 for i in range(34)),
        hidden_act="gelu_tanh",
        norm_offset=1.0,
        scale_embeddings=True,
        sandwich_norms=True,
        attention_scale=256**-0.5,
        rope_local_theta=10000.0,
        name="gemma-3-4b",
    ),
    "mixtral-8x7b-4l": ModelConfig(  # Mixtral 8x7B's widths, 4 of its 32 layers
        architecture="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=4,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rope_theta=1e6,
        num_experts=8,
        num_experts_per_tok=2,
        name="mixtral-8x7b-4l",
    ),
}


def named_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ModelLoadError(f"unknown model shape {name!r}; known: {', '.join(NAMED_CONFIGS)}") from None
