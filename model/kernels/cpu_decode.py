"""Paged decode attention on CPU that reads K/V rows in place, by index.

A matmul needs its operands contiguous, so any BLAS formulation first copies each
sequence's context out of the paged cache (today's cost: the copy, then SDPA reading the
copy). Two sparse primitives read rows by index instead:

- ``torch.sparse.sampled_addmm`` computes only the q·k dot products a CSR pattern names;
- ``F.embedding_bag`` (sum mode, per-sample weights) sums weighted V rows by index.

View a layer's cache as rows ``slot * Hkv + kv_head`` of length D. Each (sequence, query
head) is one CSR row whose columns are the cache rows of that sequence's context for the
head's KV head. A layer's decode attention is then: scores -> softmax within each row ->
weighted sum of V rows. Every reduction runs over one row's own entries, in order, so a
sequence's result does not depend on what else is in the batch or how long it is.

``sampled_addmm`` has CPU kernels for float32/float64 only; other dtypes take
:func:`per_sequence_decode_attention`, which copies one sequence's blocks at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnserve.model.kernels.gather import context_kv

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

SPARSE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class DecodeLayout:
    """Where each (sequence, query head) row's entries live; built once per step, shared by all layers."""

    crow: torch.Tensor  # (B*H + 1,) offsets of each row's entries
    cols: torch.Tensor  # (nnz,) cache row (slot * Hkv + kv_head) of each entry
    row_lens: torch.Tensor  # (B*H,) int64 entries per row (the sequence's context length)
    row_offsets: torch.Tensor  # (B*H + 1,) int64: crow as segment_reduce takes it
    pattern: torch.Tensor  # sparse CSR (B*H, num_slots * Hkv): sampled_addmm's pattern, its values the scores


def build_decode_layout(
    block_tables: torch.Tensor,  # (B, max_blocks)
    seq_lens: Sequence[int],  # host copy of each row's context length: sizes come without a device sync
    *,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    num_slots: int,
) -> DecodeLayout:
    nnz = num_heads * sum(seq_lens)
    index_dtype = torch.int32 if max(nnz, num_slots * num_kv_heads) < 2**31 else torch.int64
    device = block_tables.device
    tables = block_tables.to(index_dtype)
    offsets = torch.arange(block_size, dtype=index_dtype, device=device)
    kv_head = (torch.arange(num_heads, dtype=index_dtype, device=device) // (num_heads // num_kv_heads))[:, None]
    # One short loop over sequences (a few ops each) measured faster than one vectorised pass over
    # every entry, and than a padded (B, H, max_len) pass, which skewed lengths make wasteful.
    cols = []
    for row, length in enumerate(seq_lens):
        blocks = tables[row, : -(-length // block_size)]
        slots = (blocks[:, None] * block_size + offsets).view(-1)[:length]  # (L,)
        cols.append((slots[None, :] * num_kv_heads + kv_head).view(-1))  # (H * L,) row-major (head, token)
    row_lens = torch.tensor(seq_lens, dtype=torch.int64).repeat_interleave(num_heads)  # (B*H,)
    crow = torch.zeros(row_lens.numel() + 1, dtype=torch.int64)
    torch.cumsum(row_lens, 0, out=crow[1:])
    row_offsets, row_lens = crow.to(device), row_lens.to(device)
    cols = torch.cat(cols) if cols else torch.empty(0, dtype=index_dtype, device=device)
    pattern = torch.sparse_csr_tensor(
        row_offsets.to(index_dtype),
        cols,
        torch.zeros(nnz, device=device),
        size=(row_lens.numel(), num_slots * num_kv_heads),
        check_invariants=False,
    )
    return DecodeLayout(pattern.crow_indices(), cols, row_lens, row_offsets, pattern)


def sparse_decode_attention(
    q: torch.Tensor,  # (B, H, D) float32 or float64
    layer_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    layout: DecodeLayout,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence over its cached context. Returns (B, H, D)."""
    batch, num_heads, head_dim = q.shape
    cache_rows = layer_cache.view(2, -1, head_dim)  # (2, num_slots * Hkv, D)
    pattern = layout.pattern if layout.pattern.dtype == q.dtype else layout.pattern.to(q.dtype)
    # Written into the pattern's own values (out=): no copy of the pattern per layer. Layers run one
    # after another, so each reads its scores before the next overwrites them.
    scores = torch.sparse.sampled_addmm(
        pattern, q.reshape(batch * num_heads, head_dim), cache_rows[0].t(), beta=0.0, alpha=scale, out=pattern
    ).values()  # (nnz,)
    # Softmax within each row: subtract the row's max, exponentiate, normalise after the V sum.
    row_max = torch.segment_reduce(scores, "max", offsets=layout.row_offsets, unsafe=True)  # (B*H,)
    shift = torch.repeat_interleave(row_max, layout.row_lens, output_size=scores.numel())  # (nnz,)
    weights = (scores - shift).exp_()  # (nnz,)
    row_sum = torch.segment_reduce(weights, "sum", offsets=layout.row_offsets, unsafe=True)  # (B*H,)
    weighted = F.embedding_bag(
        layout.cols, cache_rows[1], layout.crow[:-1], mode="sum", per_sample_weights=weights
    )  # (B*H, D)
    # A row's sum is >= 1 (its max entry contributes exp(0)); padded rows (no entries) stay 0.
    out = weighted / row_sum.clamp_min(1.0)[:, None]
    return out.view(batch, num_heads, head_dim)


def per_sequence_decode_attention(
    q: torch.Tensor,  # (B, H, D)
    layer_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks)
    seq_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """Fallback for dtypes the sparse kernels lack: one sequence's blocks at a time, into SDPA."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = layer_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for row, length in enumerate(seq_lens):
        if length == 0:
            continue
        k, v = context_kv(layer_cache, block_tables[row], length)  # (Hkv, L, D) each
        # The G query heads of a KV head as G query rows: no causal mask, no K/V repeat.
        qg = q[row].view(1, num_kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(qg, k[None], v[None], scale=scale)  # (1, Hkv, G, D)
        out[row] = o.view(num_heads, head_dim)
    return out
