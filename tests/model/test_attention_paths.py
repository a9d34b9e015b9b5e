"""The CPU attention paths against a plain reference: decode read in place, prefill chunks, weights from the cache."""

from __future__ import annotations

import pytest
import torch

from attnserve.model.attention import (
    AttentionMetadata,
    attention_weights_from_cache,
    explicit_attention,
    paged_attention,
    paged_decode_attention,
)
from attnserve.model.kernels import cpu_sparse
from attnserve.model.kernels.gather import context_kv
from tests.helpers import random_paged_cache, reference_paged_attention


def _decode_case(lens: list[int], *, block_size: int, group: int, head_dim: int, dtype=torch.float32, seed: int = 0):
    num_kv_heads = 2
    cache, tables = random_paged_cache(
        lens, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, seed=seed
    )
    q = torch.randn(len(lens), group * num_kv_heads, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    return q.to(dtype), cache, tables


@pytest.mark.parametrize(("block_size", "group", "head_dim"), [(8, 1, 64), (16, 3, 128), (32, 4, 64), (16, 8, 64)])
def test_sparse_decode_matches_reference(block_size: int, group: int, head_dim: int) -> None:
    lens = [1, block_size // 2 + 1, 3 * block_size + 1, 300, 0]  # the last row is padding
    q, cache, tables = _decode_case(lens, block_size=block_size, group=group, head_dim=head_dim)
    scale = head_dim**-0.5
    out = paged_decode_attention(q, cache, tables, torch.tensor(lens, dtype=torch.int32), scale)
    for row, n in enumerate(lens):
        expected = reference_paged_attention(q[row : row + 1], cache, tables[row], n, scale)[0]
        assert (out[row].double() - expected).abs().max().item() <= 2e-6, f"row {row}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_take_the_per_sequence_path(dtype: torch.dtype) -> None:
    lens = [1, 9, 70, 0]
    q, cache, tables = _decode_case(lens, block_size=16, group=3, head_dim=64, dtype=dtype)
    out = paged_decode_attention(q, cache, tables, torch.tensor(lens, dtype=torch.int32), 0.125)
    assert out.dtype == dtype
    for row, n in enumerate(lens):
        expected = reference_paged_attention(q[row : row + 1], cache, tables[row], n, 0.125)[0]
        assert (out[row].double() - expected).abs().max().item() <= 2e-2


def test_decode_result_does_not_depend_on_the_batch() -> None:
    """Bit for bit: a sequence alone, and at another row among longer and shorter sequences."""
    lens = [37, 5, 300, 1, 64]
    q, cache, tables = _decode_case(lens, block_size=16, group=3, head_dim=64)
    scale = 0.125

    def run(rows: list[int]) -> torch.Tensor:
        layouts = cpu_sparse.build_row_layouts(
            [cpu_sparse.QueryRows(tables[r], lens[r], 1) for r in rows],
            block_size=16,
            num_heads=q.shape[1],
            num_kv_heads=2,
            num_slots=cache.shape[1] * 16,
        )
        return cpu_sparse.sparse_attention(q[rows], cache, layouts, scale)

    alone = run([0])[0]
    assert torch.equal(run([2, 1, 0, 4])[2], alone)
    assert torch.equal(run([3, 0])[1], alone)


@pytest.mark.parametrize(
    ("dtype", "cache_dtype", "batch_invariant", "tolerance"),
    [
        (torch.float32, torch.float32, True, 2e-6),
        (torch.bfloat16, torch.float32, True, 3e-2),  # the invariant path keeps K/V in float32
        (torch.float32, torch.float32, False, 2e-6),
        (torch.bfloat16, torch.bfloat16, False, 3e-2),
    ],
)
def test_prefill_chunks_and_decode_rows_in_one_step_match_reference(
    dtype: torch.dtype, cache_dtype: torch.dtype, batch_invariant: bool, tolerance: float
) -> None:
    """Fresh chunks, chunks continuing cached history, and decode rows interleaved in one batch."""
    block_size, num_heads, num_kv_heads, head_dim = 8, 6, 2, 32
    seq_lens, query_lens = [12, 30, 1 + 17, 9, 40], [12, 7, 1, 9, 1]
    cache, tables = random_paged_cache(
        seq_lens, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=cache_dtype
    )
    meta = AttentionMetadata.build(
        block_tables=tables.tolist(),
        seq_lens=seq_lens,
        query_lens=query_lens,
        block_size=block_size,
        batch_invariant=batch_invariant,
    )
    gen = torch.Generator().manual_seed(3)
    num_rows = sum(query_lens)
    q = torch.randn(num_rows, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_rows, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_rows, num_kv_heads, head_dim, generator=gen).to(dtype)
    out = paged_attention(q, torch.stack((k, v), dim=1), cache, meta, layer_index=0, scale=head_dim**-0.5)
    start = 0
    for i, (n, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        expected = reference_paged_attention(q[start : start + n], cache, tables[i], seq_len, head_dim**-0.5)
        assert (out[start : start + n].double() - expected).abs().max().item() <= tolerance, f"sequence {i}"
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_query_row_is_the_same_bits_however_its_prompt_is_split_or_batched(dtype: torch.dtype) -> None:
    """One 50-token prompt: whole, in chunks of 7, one token at a time (decode rows), and its last
    chunk batched among other sequences' chunks and decode rows: every row bit for bit the same."""
    block_size, num_heads, num_kv_heads, head_dim, length = 8, 9, 3, 64, 50
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(length, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(length, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(length, num_kv_heads, head_dim, generator=gen).to(dtype)
    table = list(range(20, 27))
    other_q = torch.randn(40, num_heads, head_dim, generator=gen).to(dtype)
    other_kv = torch.randn(2, 40, num_kv_heads, head_dim, generator=gen).to(dtype)

    def run(splits: list[int], *, others: bool = False) -> torch.Tensor:
        cache = torch.zeros(2, 40, block_size, num_kv_heads, head_dim)  # float32: the invariant path's K/V
        outs, done = [], 0
        for n in splits:
            tables, seq_lens, query_lens = [table], [done + n], [n]
            qs, ks, vs = [q[done : done + n]], [k[done : done + n]], [v[done : done + n]]
            if others:  # a fresh 33-token chunk before it, a decode row after it
                tables, seq_lens, query_lens = [[1, 2, 3, 4, 5], table, [9, 10]], [33, done + n, 12], [33, n, 1]
                qs = [other_q[:33], *qs, other_q[33:34]]
                ks = [other_kv[0, :33], *ks, other_kv[0, 33:34]]
                vs = [other_kv[1, :33], *vs, other_kv[1, 33:34]]
            meta = AttentionMetadata.build(
                block_tables=tables, seq_lens=seq_lens, query_lens=query_lens, block_size=block_size
            )
            kv = torch.stack((torch.cat(ks), torch.cat(vs)), dim=1)
            out = paged_attention(torch.cat(qs), kv, cache, meta, layer_index=0, scale=0.125)
            outs.append(out[33 : 33 + n] if others else out)
            done += n
        return torch.cat(outs)

    whole = run([length])
    assert torch.equal(run([7] * 7 + [1]), whole)
    assert torch.equal(run([1] * length), whole)
    assert torch.equal(run([20, 17, 13], others=True), whole)


@pytest.mark.parametrize(("start", "num_queries"), [(0, 1), (0, 13), (21, 1), (21, 6)])
def test_weights_from_cache_equal_explicit_attention(start: int, num_queries: int) -> None:
    seq_len = start + num_queries
    cache, tables = random_paged_cache([seq_len], block_size=8, num_kv_heads=2, head_dim=16)
    q = torch.randn(num_queries, 6, 16, generator=torch.Generator().manual_seed(4))  # (n, H, D)
    weights = attention_weights_from_cache(q, cache, tables[0], start=start, scale=0.25)
    assert weights.shape == (6, num_queries, seq_len) and weights.dtype == torch.float32
    k, v = context_kv(cache, tables[0], seq_len)
    _, expected = explicit_attention(q.transpose(0, 1), k, v, scale=0.25)
    assert torch.equal(weights, expected)
    # Causal: query j (position start + j) gives no weight to later keys.
    assert bool((weights.triu(diagonal=start + 1) == 0).all())


def test_metadata_slots_follow_the_block_tables() -> None:
    meta = AttentionMetadata.build(block_tables=[[3, 1], [2]], seq_lens=[6, 2], query_lens=[3, 1], block_size=4)
    # Sequence 0: positions 3, 4, 5 -> block 3 slot 3, then block 1 slots 0, 1. Sequence 1: position 1 of block 2.
    assert meta.slot_mapping.tolist() == [15, 4, 5, 9]
    assert meta.positions.tolist() == [3, 4, 5, 1]
    assert meta.decode_block_tables is not None and meta.decode_block_tables.tolist() == [[2]]
    assert meta.prefill_block_tables is not None and meta.prefill_block_tables.tolist() == [[3, 1]]
    assert meta.query_starts == [0, 3]
