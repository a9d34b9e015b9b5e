"""Paged attention on CPU for any query row, reading K/V rows in place, in one fixed order per row.

A matmul needs its operands contiguous, so any BLAS formulation first copies each
sequence's context out of the paged cache; worse, BLAS and SDPA pick their blocking (and
so the order of a row's sums) from the shapes of the call: how many queries, how long
the context of the chunk. Two sparse primitives read rows by index instead:

- ``torch.sparse.sampled_addmm`` computes only the q·k dot products a CSR pattern names;
- ``F.embedding_bag`` (sum mode, per-sample weights) sums weighted V rows by index.

View a layer's cache as rows ``slot * Hkv + kv_head`` of length D. Each (query token,
query head) is one CSR row whose columns are the cache rows of the positions it sees
(0 .. its own position) for the head's KV head. Attention is then: scores -> softmax within
each row -> weighted sum of V rows. Every reduction runs over one row's own entries, in
order, so a query's result is the same bits whether it is a decode row, one row of a
prefill chunk of any size, batched with anything, or computed over a prefix read from the
cache: batching, chunking and prefix caching are invisible in the output.

``sampled_addmm`` has CPU kernels for float32/float64 only, so this path keeps K/V in
float32 (a bf16 or fp16 model's K/V are stored exactly, upcast) and computes in float32.
:func:`per_sequence_decode_attention` is the fast path's decode for other cache dtypes.
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
# Entries per CSR pattern: a long prefill is split into groups of rows so the scores and
# weights of one layer stay bounded (a row's result does not depend on its group).
MAX_ENTRIES_PER_GROUP = 1 << 23


@dataclass(frozen=True)
class QueryRows:
    """The query rows of one sequence in a step: its last ``num_queries`` of ``seq_len`` positions."""

    block_table: torch.Tensor  # (>= ceil(seq_len / block_size),) block ids; 0 rows for padding
    seq_len: int  # context once this step's tokens are in the cache; 0 = a padding row
    num_queries: int


@dataclass(frozen=True)
class RowLayout:
    """Where each (query token, head) row's entries live, for a contiguous range of query tokens.

    Built once per step and shared by all layers.
    """

    first_token: int  # the range of query tokens (rows of the flattened batch) it covers
    num_tokens: int
    crow: torch.Tensor  # (rows + 1,) offsets of each row's entries
    cols: torch.Tensor  # (nnz,) cache row (slot * Hkv + kv_head) of each entry
    row_lens: torch.Tensor  # (rows,) int64 entries per row (its position + 1, or its window)
    row_offsets: torch.Tensor  # (rows + 1,) int64: crow as segment_reduce takes it
    pattern: torch.Tensor  # sparse CSR (rows, num_slots * Hkv): sampled_addmm's pattern, its values the scores


def build_row_layouts(
    sequences: Sequence[QueryRows],
    *,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    num_slots: int,
    window: int | None = None,
    max_entries: int = MAX_ENTRIES_PER_GROUP,
) -> list[RowLayout]:
    """The CSR layouts of a step's query rows, in batch order, in groups of at most ``max_entries``
    entries (a single row longer than that is a group of its own). With a sliding ``window``, the
    row at position p sees only positions p - window + 1 .. p."""
    kv_head = torch.arange(num_heads) // (num_heads // num_kv_heads)  # (H,)
    positions = torch.arange(max((s.seq_len for s in sequences), default=0))
    layouts: list[RowLayout] = []
    cols: list[torch.Tensor] = []
    lens: list[torch.Tensor] = []
    first = token = entries = 0

    def close() -> None:
        nonlocal first, entries
        if token > first:
            layouts.append(_layout(first, token - first, cols, lens, num_slots * num_kv_heads))
        cols.clear()
        lens.clear()
        first, entries = token, 0

    for seq in sequences:
        length, n = seq.seq_len, seq.num_queries
        if length == 0:  # padding rows: no entries, the output stays zero
            cols.append(torch.empty(0, dtype=torch.int64))
            lens.append(torch.zeros(n * num_heads, dtype=torch.int64))
            token += n
            continue
        blocks = seq.block_table[: -(-length // block_size)].long()
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).view(-1)[:length]  # (L,)
        per_head = slots[None, :] * num_kv_heads + kv_head[:, None]  # (H, L) row-major (head, token)
        # Row (t, h) sees positions 0 .. its own; the rows of a chunk take as few groups as fit.
        # Sizes are host arithmetic: building a layout never waits on a tensor.
        step = max(1, max_entries // (num_heads * length))
        for first_pos in range(length - n, length, step):
            count = min(step, length - first_pos)
            row_entries = num_heads * sum(_visible(p, window) for p in range(first_pos, first_pos + count))
            if entries and entries + row_entries > max_entries:
                close()
            seen = torch.arange(first_pos + 1, first_pos + count + 1)  # (r,) one past each row's position
            visible = positions[None, None, :length] < seen[:, None, None]  # (r, 1, L)
            if window is not None:
                visible &= positions[None, None, :length] >= seen[:, None, None] - window
                seen = seen.clamp(max=window)
            cols.append(per_head.expand(count, -1, -1)[visible.expand(-1, num_heads, -1)])
            lens.append(seen.repeat_interleave(num_heads))
            token += count
            entries += row_entries
    close()
    return layouts


def _visible(position: int, window: int | None) -> int:
    return position + 1 if window is None else min(position + 1, window)


def _layout(first: int, num_tokens: int, cols: list[torch.Tensor], lens: list[torch.Tensor], width: int) -> RowLayout:
    row_lens = torch.cat(lens)
    flat = torch.cat(cols)
    index_dtype = torch.int32 if max(flat.numel(), width) < 2**31 else torch.int64
    crow = torch.zeros(row_lens.numel() + 1, dtype=torch.int64)
    torch.cumsum(row_lens, 0, out=crow[1:])
    pattern = torch.sparse_csr_tensor(
        crow.to(index_dtype),
        flat.to(index_dtype),
        torch.zeros(flat.numel()),
        size=(row_lens.numel(), width),
        check_invariants=False,
    )
    return RowLayout(first, num_tokens, pattern.crow_indices(), pattern.col_indices(), row_lens, crow, pattern)


def sparse_attention(
    q: torch.Tensor,  # (T, H, D)
    layer_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D) float32 or float64
    layouts: Sequence[RowLayout],
    scale: float,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of every query row over the positions it sees, computed in the cache's dtype.

    Returns (T, H, D) in q's dtype.
    """
    if layer_cache.dtype not in SPARSE_DTYPES:
        raise ValueError(f"the row-exact CPU attention keeps K/V in float32 or float64, not {layer_cache.dtype}")
    num_tokens, num_heads, head_dim = q.shape
    out_dtype = q.dtype
    cache_rows = layer_cache.view(2, -1, head_dim)  # (2, num_slots * Hkv, D)
    q_rows = (q if q.dtype == layer_cache.dtype else q.to(layer_cache.dtype)).reshape(-1, head_dim)  # (T*H, D)
    out = torch.empty(num_tokens * num_heads, head_dim, dtype=layer_cache.dtype)
    for layout in layouts:
        rows = slice(layout.first_token * num_heads, (layout.first_token + layout.num_tokens) * num_heads)
        pattern = layout.pattern if layout.pattern.dtype == q_rows.dtype else layout.pattern.to(q_rows.dtype)
        # Written into the pattern's own values (out=): no copy of the pattern per layer. Layers run one
        # after another, so each reads its scores before the next overwrites them.
        scores = torch.sparse.sampled_addmm(
            pattern, q_rows[rows], cache_rows[0].t(), beta=0.0, alpha=scale, out=pattern
        ).values()  # (nnz,)
        if softcap is not None:  # Gemma 2: cap * tanh(score / cap), elementwise, before the softmax
            scores = torch.tanh(scores / softcap).mul_(softcap)
        # Softmax within each row: subtract the row's max, exponentiate, normalise after the V sum.
        row_max = torch.segment_reduce(scores, "max", offsets=layout.row_offsets, unsafe=True)  # (rows,)
        shift = torch.repeat_interleave(row_max, layout.row_lens, output_size=scores.numel())  # (nnz,)
        weights = (scores - shift).exp_()  # (nnz,)
        row_sum = torch.segment_reduce(weights, "sum", offsets=layout.row_offsets, unsafe=True)  # (rows,)
        weighted = F.embedding_bag(
            layout.cols, cache_rows[1], layout.crow[:-1], mode="sum", per_sample_weights=weights
        )  # (rows, D)
        # A row's sum is >= 1 (its max entry contributes exp(0)); padded rows (no entries) stay 0.
        torch.div(weighted, row_sum.clamp_min(1.0)[:, None], out=out[rows])
    out = out.view(num_tokens, num_heads, head_dim)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def per_sequence_decode_attention(
    q: torch.Tensor,  # (B, H, D)
    layer_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks)
    seq_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """The fast path's decode for dtypes the sparse kernels lack: one sequence's blocks at a time, into SDPA."""
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
