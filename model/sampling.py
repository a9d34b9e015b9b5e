"""Sampling as pure, batched tensor functions with per-row parameters.

Every function takes logits (B, V) and per-row parameter tensors (B,). A row's
"off" values are neutral: temperature 0 means greedy, top_k 0 (or >= V) keeps
all, top_p 1 keeps all, min_p 0 keeps all, repetition_penalty 1 changes nothing.

Seeded rows draw their noise from their own generator, so a seeded request gets
the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK = float("-inf")


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of a batch, as tensors on the logits' device."""

    temperature: torch.Tensor  # (B,) float; 0 = greedy
    top_k: torch.Tensor  # (B,) long; 0 = off
    top_p: torch.Tensor  # (B,) float; 1 = off
    min_p: torch.Tensor  # (B,) float; 0 = off
    repetition_penalty: torch.Tensor  # (B,) float; 1 = off

    @classmethod
    def from_lists(
        cls,
        *,
        temperature: Sequence[float],
        top_k: Sequence[int] | None = None,
        top_p: Sequence[float] | None = None,
        min_p: Sequence[float] | None = None,
        repetition_penalty: Sequence[float] | None = None,
        device: torch.device | str = "cpu",
    ) -> SamplingTensors:
        n = len(temperature)

        def tensor(values: Sequence[float] | None, default: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(list(values) if values is not None else [default] * n, dtype=dtype, device=device)

        return cls(
            temperature=tensor(temperature, 0.0, torch.float32),
            top_k=tensor(top_k, 0, torch.long),
            top_p=tensor(top_p, 1.0, torch.float32),
            min_p=tensor(min_p, 0.0, torch.float32),
            repetition_penalty=tensor(repetition_penalty, 1.0, torch.float32),
        )


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on tokens already seen: positive logits divided, negative multiplied.

    seen_ids: (B, L) token ids per row, padded with -1.
    """
    vocab = logits.shape[1]
    padded = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)  # column V absorbs padding
    index = torch.where(seen_ids < 0, vocab, seen_ids)
    picked = padded.gather(1, index)
    p = penalty[:, None]
    padded = padded.scatter(1, index, torch.where(picked > 0, picked / p, picked * p))
    return padded[:, :vocab]


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide by temperature; greedy rows (0) are left as they are."""
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / safe[:, None]


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) every token that top-k, top-p or min-p excludes. The best token always survives."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, _MASK).softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (a token is dropped if
    # the mass *before* it already reaches p).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    # min-p: drop tokens less likely than min_p times the most likely one.
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return logits.masked_fill(mask, _MASK)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one seeded request at one decode step.

    Derived from (seed, step) alone, so the draw does not depend on batch
    composition nor on how often the request was preempted and recomputed.
    """
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)


def sample_from_probs(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row: argmax(p / E) with E ~ Exp(1), the exponential race.

    Rows with a generator draw their own noise; the others share one batched draw.
    """
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row] = torch.empty(probs.shape[1], device=probs.device).exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    params: SamplingTensors,
    *,
    seen_ids: torch.Tensor | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Choose the next token of every row. logits: (B, V) float32. Returns (B,) long."""
    if seen_ids is not None and bool((params.repetition_penalty != 1.0).any()):
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    greedy = logits.argmax(dim=-1)
    is_random = params.temperature > 0
    if not bool(is_random.any()):
        return greedy
    rows = is_random.nonzero().squeeze(1)
    sub = apply_temperature(logits[rows], params.temperature[rows])
    sub = apply_top_k_top_p_min_p(sub, params.top_k[rows], params.top_p[rows], params.min_p[rows])
    gens = [None] * len(rows) if generators is None else [generators[int(r)] for r in rows]
    greedy[rows] = sample_from_probs(sub.softmax(dim=-1), gens)
    return greedy


def top_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens (B,) and of the top-n alternatives (B, n) with their ids."""
    logprobs = logits.log_softmax(dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, top_values, top_ids
