"""Rotary position embeddings (the Hugging Face "rotate half" convention)."""

from __future__ import annotations

import math

import torch

from attnserve.model.config import ModelConfig, RopeScaling


def inverse_frequencies(
    config: ModelConfig, freq_factors: torch.Tensor | None = None, *, long: bool = False
) -> torch.Tensor:
    """(rope_dim / 2,) float32 inverse frequencies, after any scaling (``long``: longrope's
    factors for positions past the original context)."""
    dim = config.rope_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if freq_factors is not None:  # per-frequency divisors stored in a GGUF (llama3 scaling baked in)
        inv_freq = inv_freq / freq_factors.to(torch.float64)
    elif scaling is not None and scaling.rope_type == "longrope":
        factors = scaling.long_factor if long else scaling.short_factor
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64)
    elif scaling is not None:
        inv_freq = _scale(inv_freq, scaling)
    return inv_freq.float()


def attention_factor(scaling: RopeScaling | None) -> float:
    """longrope's scale of cos and sin (1 otherwise): sqrt(1 + ln(factor) / ln(original context))."""
    if scaling is None or scaling.rope_type != "longrope":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(scaling.factor) / math.log(scaling.original_max_position_embeddings))


def _scale(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: leave high frequencies alone, divide low ones by `factor`, blend between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding:
    """Holds cos/sin tables for every position; looked up by position ids.

    Not an nn.Module: the tables are derived data, rebuilt for a device on demand,
    never part of a checkpoint.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.freq_factors: torch.Tensor | None = None
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        self.freq_factors = factors.detach().float().cpu()
        self._tables.clear()

    def tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._tables:
            inv_freq = inverse_frequencies(self.config, self.freq_factors)
            t = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            scaling = self.config.rope_scaling
            if scaling is not None and scaling.rope_type == "longrope":
                # Per position, not per batch: positions past the original context take the long
                # factors (transformers switches the whole forward once any position is past it,
                # which would make a token's keys depend on how long its batch's longest prompt was).
                long = torch.outer(t, inverse_frequencies(self.config, long=True))
                freqs = torch.where(t[:, None] < scaling.original_max_position_embeddings, freqs, long)
            emb = torch.cat([freqs, freqs], dim=-1)  # (P, rope_dim)
            mscale = attention_factor(scaling)
            self._tables[key] = ((emb.cos() * mscale).to(device, dtype), (emb.sin() * mscale).to(device, dtype))
        return self._tables[key]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.tables(positions.device, dtype)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (T, 1, D)


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``apply_rotary``, written into x (a view of the projections): the same ops, the same bits."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    x.mul_(cos).add_(rotated.mul_(sin))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, D) rotated by (T, 1, D) tables."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
