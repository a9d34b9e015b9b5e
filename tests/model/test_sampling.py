"""Sampling: seeded reproducibility, batch independence, and filters that never leak."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.model.sampling import (
    SamplingTensors,
    apply_repetition_penalty,
    apply_top_k_top_p_min_p,
    fetch_sampled,
    sample,
    step_generator,
    top_logprobs,
)

VOCAB = 50


def _logits(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    top_k=st.integers(0, VOCAB + 5),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
    draw_seed=st.integers(0, 2**31 - 1),
)
def test_filters_never_pick_an_excluded_token(
    seed: int, top_k: int, top_p: float, min_p: float, draw_seed: int
) -> None:
    logits = _logits(seed)
    # The allowed set, by the definitions: top-k first, then top-p over the renormalised
    # top-k mass (smallest prefix reaching p), then min-p relative to the best token.
    k = VOCAB if top_k == 0 or top_k > VOCAB else top_k
    order = logits[0].argsort(descending=True).tolist()[:k]
    probs = logits[0, order].softmax(-1).tolist()
    allowed, mass = set(), 0.0
    for rank, (token, p) in enumerate(zip(order, probs, strict=True)):
        # top_p = 1 is "off" (the sampler then skips the filter): a float cumsum reaching 1.0 a token early
        # must not make the reference drop the tail.
        if rank == 0 or ((top_p >= 1.0 or mass < top_p) and p >= min_p * probs[0]):
            allowed.add(token)
        mass += p
    params = SamplingTensors.from_lists(temperature=[1.0], top_k=[top_k], top_p=[top_p], min_p=[min_p])
    masked = apply_top_k_top_p_min_p(logits, params.top_k, params.top_p, params.min_p)
    kept = set(torch.isfinite(masked[0]).nonzero().flatten().tolist())
    assert kept == allowed
    for _ in range(5):
        token = int(sample(logits, params, generators=[step_generator(draw_seed, _)])[0])
        assert token in kept


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingTensors.from_lists(temperature=[1.0], top_p=[0.8])
    kept = torch.isfinite(apply_top_k_top_p_min_p(logits, p.top_k, p.top_p, p.min_p))[0].tolist()
    assert kept == [True, True, False, False]


def test_greedy_rows_take_the_argmax() -> None:
    logits = _logits(0, rows=4)
    params = SamplingTensors.from_lists(temperature=[0.0, 0.0, 0.0, 0.0])
    assert sample(logits, params).tolist() == logits.argmax(-1).tolist()


def test_seeded_rows_reproduce_and_ignore_their_batch() -> None:
    target = _logits(7)
    alone_params = SamplingTensors.from_lists(temperature=[0.9], top_p=[0.95])
    alone = [int(sample(target, alone_params, generators=[step_generator(42, s)])[0]) for s in range(30)]
    again = [int(sample(target, alone_params, generators=[step_generator(42, s)])[0]) for s in range(30)]
    assert alone == again
    # The same row inside a batch of others, unseeded and seeded differently, at a different index.
    batch = torch.cat([_logits(1), _logits(2), target, _logits(3)])
    params = SamplingTensors.from_lists(temperature=[1.0, 0.0, 0.9, 0.7], top_p=[1.0, 1.0, 0.95, 0.5])
    in_batch = [
        int(sample(batch, params, generators=[None, None, step_generator(42, s), step_generator(5, s)])[2])
        for s in range(30)
    ]
    assert in_batch == alone
    assert len(set(alone)) > 1, "a temperature-0.9 draw should not be constant"


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    params = SamplingTensors.from_lists(temperature=[1.0])
    draws = torch.tensor([int(sample(logits, params, generators=[step_generator(0, s)])[0]) for s in range(3000)])
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[0, 1, -1]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_logprobs_of_chosen_and_top_n() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    chosen, values, ids = top_logprobs(logits, torch.tensor([1]), top_n=2)
    assert torch.allclose(chosen.exp(), torch.tensor([0.3]))
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(values.exp(), torch.tensor([[0.6, 0.3]]))


def _count_sorts(monkeypatch) -> list[int]:
    calls = [0]
    original = torch.Tensor.sort

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sort", counted)
    return calls


def test_no_sort_unless_a_sampling_row_filters(monkeypatch) -> None:
    sorts = _count_sorts(monkeypatch)
    logits = _logits(3, rows=3)
    plain = SamplingTensors.from_lists(temperature=[0.0, 0.8, 1.0], top_p=[0.5, 1.0, 1.0])  # top-p on a greedy row
    sample(logits, plain, generators=[None, step_generator(1, 0), None])
    assert sorts[0] == 0
    filtered = SamplingTensors.from_lists(temperature=[0.0, 0.8, 1.0], top_k=[0, 5, 0])
    sample(logits, filtered)
    assert sorts[0] == 1


def test_only_random_rows_are_drawn_and_greedy_rows_keep_the_argmax() -> None:
    logits = _logits(4, rows=5)
    params = SamplingTensors.from_lists(temperature=[0.0, 1.0, 0.0, 0.5, 0.0], top_k=[0, 3, 0, 0, 0])
    assert params.random_rows == [1, 3] and params.needs_filter and not params.needs_penalty
    tokens = sample(logits, params, generators=[None, step_generator(3, 1), None, None, None])
    argmax = logits.argmax(-1)
    assert tokens[[0, 2, 4]].tolist() == argmax[[0, 2, 4]].tolist()
    assert int(tokens[1]) in logits[1].topk(3).indices.tolist()


def test_fetch_sampled_brings_tokens_and_logprobs_in_one_piece() -> None:
    logits = _logits(5, rows=3)
    tokens = torch.tensor([4, 0, 49])
    fetched = fetch_sampled(tokens, logits, num_top=2)
    chosen, values, ids = top_logprobs(logits, tokens, 2)
    assert fetched.token_ids == [4, 0, 49]
    assert fetched.logprobs == chosen.tolist()
    assert fetched.top_token_ids == ids.tolist() and fetched.top_logprobs == values.tolist()
    assert fetch_sampled(tokens).token_ids == [4, 0, 49] and fetch_sampled(tokens).logprobs is None
