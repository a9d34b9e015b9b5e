"""Sampling as pure, batched tensor functions with per-row parameters.

Every function takes logits (B, V) and per-row parameter tensors (B,). A row's
"off" values are neutral: temperature 0 means greedy, top_k 0 (or >= V) keeps
all, top_p 1 keeps all, min_p 0 keeps all, repetition_penalty 1 changes nothing.

Seeded rows draw their noise from their own generator, so a seeded request gets
the same tokens whatever else shares its batch.

Nothing here reads the device to decide what to do: the host-side fields of
``SamplingTensors`` choose the machinery, and :func:`fetch_sampled` brings a step's
tokens and logprobs back in one transfer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK = float("-inf")


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of a batch, as tensors on the logits' device.

    The host-side fields say which machinery :func:`sample` needs, so it decides without
    reading the device (each such read is a host sync on a GPU). Left at their defaults,
    every row may sample and every filter runs: correct, only slower.
    """

    temperature: torch.Tensor  # (B,) float; 0 = greedy
    top_k: torch.Tensor  # (B,) long; 0 = off
    top_p: torch.Tensor  # (B,) float; 1 = off
    min_p: torch.Tensor  # (B,) float; 0 = off
    repetition_penalty: torch.Tensor  # (B,) float; 1 = off
    random_rows: list[int] | None = None  # rows with temperature > 0; None = not known on the host
    random_index: torch.Tensor | None = None  # (R,) random_rows on the device, when they are a strict subset
    needs_filter: bool = True  # some random row uses top-k, top-p or min-p
    needs_penalty: bool = True  # some row has a repetition penalty

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
        top_k = list(top_k) if top_k is not None else [0] * n
        top_p = list(top_p) if top_p is not None else [1.0] * n
        min_p = list(min_p) if min_p is not None else [0.0] * n
        penalty = list(repetition_penalty) if repetition_penalty is not None else [1.0] * n
        # One host-to-device copy for all five rows of parameters (top-k < 2^24 is exact in float32).
        packed = torch.tensor([list(temperature), top_k, top_p, min_p, penalty], dtype=torch.float32).to(device)
        random_rows = [i for i, t in enumerate(temperature) if t > 0]
        is_subset = 0 < len(random_rows) < n
        return cls(
            temperature=packed[0],
            top_k=packed[1].long(),
            top_p=packed[2],
            min_p=packed[3],
            repetition_penalty=packed[4],
            random_rows=random_rows,
            random_index=torch.tensor(random_rows, dtype=torch.long).to(device) if is_subset else None,
            needs_filter=any(top_k[i] > 0 or top_p[i] < 1.0 or min_p[i] > 0.0 for i in random_rows),
            needs_penalty=any(p != 1.0 for p in penalty),
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

    Rows with a generator draw their own noise (a host-side loop: no device reads); the
    others share one batched draw. ``generators`` may be shorter than the batch (missing = None).
    """
    noise = torch.empty_like(probs)
    if len(generators) < probs.shape[0] or any(gen is None for gen in generators):
        noise.exponential_()
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
    """Choose the next token of every row. logits: (B, V) float32. Returns (B,) long.

    The host-side fields of ``params`` pick the work: all greedy -> argmax only; no filter
    asked -> no sort; only the random rows are tempered, filtered and drawn.
    """
    if params.needs_penalty and seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    greedy = logits.argmax(dim=-1)  # (B,)
    rows = params.random_rows
    if rows is not None and not rows:
        return greedy
    index = None
    if rows is not None and len(rows) < logits.shape[0]:
        index = params.random_index
        if index is None:
            index = torch.tensor(rows, dtype=torch.long).to(logits.device)

    def pick(t: torch.Tensor) -> torch.Tensor:  # the random rows of a per-row tensor
        return t if index is None else t.index_select(0, index)

    sub = apply_temperature(pick(logits), pick(params.temperature))  # (R, V)
    if params.needs_filter:
        sub = apply_top_k_top_p_min_p(sub, pick(params.top_k), pick(params.top_p), pick(params.min_p))
    gens = list(generators or [])
    gens += [None] * (logits.shape[0] - len(gens))
    drawn = sample_from_probs(sub.softmax(dim=-1), [gens[r] for r in rows] if rows is not None else gens)
    if index is not None:
        return greedy.index_copy(0, index, drawn)
    if rows is None:  # random rows not known on the host: choose per row on the device
        return torch.where(params.temperature > 0, drawn, greedy)
    return drawn


def top_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens (B,) and of the top-n alternatives (B, n) with their ids."""
    logprobs = logits.log_softmax(dim=-1)
    chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1)
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return chosen_lp, top_values, top_ids


@dataclass
class SampledRows:
    """A step's sampled tokens on the host, with their logprobs where asked."""

    token_ids: list[int]
    logprobs: list[float] | None = None  # the chosen token's logprob per row; None when not asked
    top_token_ids: list[list[int]] | None = None  # (B, n) the n most likely tokens per row
    top_logprobs: list[list[float]] | None = None  # (B, n) their logprobs


def fetch_sampled(tokens: torch.Tensor, logits: torch.Tensor | None = None, *, num_top: int = 0) -> SampledRows:
    """Bring the sampled tokens (B,) to the host, with logprobs from ``logits`` (B, V) if given: one transfer.

    Logprobs are computed on the device for every row (cheaper than choosing rows), then
    packed with the tokens into one float64 matrix: ids below 2^53 and float32 logprobs are
    exact in it, so a single ``.tolist()`` is the step's only host sync.
    """
    if logits is None:
        return SampledRows(tokens.tolist())
    chosen, values, ids = top_logprobs(logits, tokens, num_top)
    packed = torch.cat(
        [tokens[:, None].double(), chosen[:, None].double(), ids.double(), values.double()], dim=1
    )  # (B, 2 + 2n)
    rows = packed.tolist()
    return SampledRows(
        token_ids=[int(r[0]) for r in rows],
        logprobs=[r[1] for r in rows],
        top_token_ids=[[int(i) for i in r[2 : 2 + num_top]] for r in rows],
        top_logprobs=[r[2 + num_top :] for r in rows],
    )
