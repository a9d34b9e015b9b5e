"""Paged attention over a flattened batch of tokens from several sequences.

A step's batch is the concatenation of each sequence's *new* tokens (a prefill
chunk, or one token when decoding). Every new token's K/V is first written to its
cache slot; then each sequence attends to its whole history in the cache.

- On CPU, by default (``batch_invariant``), every query row, decode or prefill, takes one
  path: sparse row-indexed kernels that read K/V in place and reduce each row over its own
  entries in a fixed order (model/kernels/cpu_sparse.py), so a row's result never depends
  on the batch, the chunking or the prefix cache. K/V are then kept in float32.
- The fast path (``batch_invariant=False``) reads decode rows the same way (float32) or one
  sequence at a time (other dtypes), and sends each prefill chunk to SDPA, whose blocking
  follows the chunk's shape: about 3.5x faster on a 512-token prefill, not invariant.
- On CUDA, decode rows take a Triton kernel and the prefill chunks one Triton launch.

Every token takes the fused path; none materialises weights. For the sequences that ask,
the forward keeps the *queries* of the asked rows at the asked layers (a copy of a few
rows, nothing that would stop a step from being captured as a graph); afterwards
:func:`captured_attention_weights` computes ``softmax(q·Kᵀ/√d)`` for those rows alone
from the paged cache, one (sequence, layer) at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnserve.model.hooks import LayerHooks
from attnserve.model.kernels import cpu_native, cpu_sparse
from attnserve.model.kernels.gather import context_kv

# (sequence index, layer index) -> the asked rows' queries (rows, num_heads, head_dim), rotated.
CapturedQueries = dict[tuple[int, int], torch.Tensor]


@dataclass
class PrefillChunk:
    """One sequence whose step has more than one new token."""

    seq_index: int
    token_start: int  # row range of its new tokens in the flattened batch
    token_end: int
    seq_len: int  # context length once the chunk is in the cache
    block_table: torch.Tensor  # (num_blocks,) int32, the blocks holding its context

    @property
    def is_fresh(self) -> bool:
        """No cached history: the new tokens are the whole context."""
        return self.token_end - self.token_start == self.seq_len


@dataclass
class AttentionMetadata:
    """How a flattened batch maps onto sequences and onto the paged cache.

    Built once per step with :meth:`build` and shared by every layer. Decode rows may be
    padded (``seq_len`` 0, block table of zeros): they cost little and come out as zeros.
    """

    slot_mapping: torch.Tensor  # (T,) cache slot for each new token's K/V
    positions: torch.Tensor  # (T,) position of each new token in its sequence
    query_lens: list[int]
    seq_lens: list[int]  # context length of each sequence after this step
    query_starts: list[int]  # first row of each sequence in the flattened batch
    prefills: list[PrefillChunk]
    decode_rows: torch.Tensor | None  # (Bd,) batch rows of the one-token sequences
    decode_seq_indices: list[int]
    decode_block_tables: torch.Tensor | None  # (Bd, max_blocks) int32, padded with block 0
    decode_seq_lens: torch.Tensor | None  # (Bd,) int32
    is_pure_decode: bool  # every sequence decodes one token: batch rows are the decode rows
    logits_indices: torch.Tensor | None  # rows to compute logits for; None = every row
    # The prefill chunks as one launch's arguments (one row per chunk, in ``prefills`` order).
    prefill_block_tables: torch.Tensor | None = None  # (P, max_blocks) int32
    prefill_query_starts: torch.Tensor | None = None  # (P,) int32
    prefill_query_lens: torch.Tensor | None = None  # (P,) int32
    prefill_seq_lens: torch.Tensor | None = None  # (P,) int32
    # Attention weights: sequence index -> layers whose weights to return, and which of its
    # rows (first row within its chunk, number of rows; default every row).
    attention_requests: Mapping[int, frozenset[int]] = field(default_factory=dict)
    attention_rows: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    captured_queries: CapturedQueries = field(default_factory=dict)
    # A captured (graph) decode step keeps every row's queries of every layer here instead,
    # (num_layers, B, H, D): a copy inside the graph, no Python per asked row.
    query_sink: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None  # (T,) the step's tokens, when build() was given them
    # CPU: every row through the row-exact sparse path (see the module docstring).
    batch_invariant: bool = True
    # The native row kernel's arguments (CPU, batch-invariant, kernels built): every sequence's block table
    # (S, W) int32, each row's sequence (T,) int32 and how many positions it sees (T,) int64.
    row_tables: torch.Tensor | None = None
    row_seqs: torch.Tensor | None = None
    row_contexts: torch.Tensor | None = None
    # Reads, steering and head scaling of chosen rows, per layer (model/hooks.py); empty: none.
    hooks: dict[int, LayerHooks] = field(default_factory=dict)
    # Per-step derived layouts shared by every layer (the CPU sparse patterns).
    _cpu_layouts: dict[tuple[int, int, int, bool, int | None], list[cpu_sparse.RowLayout]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @classmethod
    def build(
        cls,
        *,
        block_tables: Sequence[Sequence[int]],
        seq_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
        logits_indices: Sequence[int] | None = None,
        attention_requests: Mapping[int, Sequence[int]] | None = None,
        attention_rows: Mapping[int, tuple[int, int]] | None = None,
        table_rows: torch.Tensor | None = None,
        token_ids: Sequence[int] | None = None,
        batch_invariant: bool = True,
    ) -> AttentionMetadata:
        """Derive slots, positions and per-group layouts from block tables (host lists, no device reads).

        ``seq_lens[i]`` counts sequence ``i``'s tokens once this step's
        ``query_lens[i]`` new tokens are in the cache; its block table must cover them.
        ``table_rows`` (num_seqs, width) int32, if given, holds the same block tables as host rows
        kept from step to step (the runner's): the tables are sliced from it, not rebuilt from lists.
        ``token_ids``, if given, travel in the same copy (``input_ids``).
        Everything the device needs goes in one copy (pinned and non-blocking on CUDA).
        """
        _check(block_tables, seq_lens, query_lens, block_size)
        positions: list[int] = []
        slots: list[int] = []
        query_starts: list[int] = []
        for table, seq_len, query_len in zip(block_tables, seq_lens, query_lens, strict=True):
            query_starts.append(len(positions))
            if query_len == 1:  # a decode row (most rows of a busy step): one slot, no ranges
                position = seq_len - 1
                positions.append(position)
                slots.append(table[position // block_size] * block_size + position % block_size)
            else:
                positions.extend(range(seq_len - query_len, seq_len))
                slots.extend(_slots(table, seq_len - query_len, seq_len, block_size))
        decode_seqs = [i for i, q in enumerate(query_lens) if q == 1]
        prefill_seqs = [i for i, q in enumerate(query_lens) if q > 1]
        upload = _Upload(device)
        decode_tables = upload.table(block_tables, seq_lens, decode_seqs, block_size, table_rows)
        prefill_tables = upload.table(block_tables, seq_lens, prefill_seqs, block_size, table_rows)
        # Decided once per step: every layer asks native_rows(meta), which reads it from row_tables.
        native_rows = batch_invariant and torch.device(device).type == "cpu" and cpu_native.available()
        if native_rows:
            all_tables = upload.table(block_tables, seq_lens, list(range(len(seq_lens))), block_size, table_rows)
        fields = {
            "slot_mapping": upload.ints(slots),
            "positions": upload.ints(positions),
            "decode_rows": upload.ints([query_starts[i] for i in decode_seqs]),
            "decode_seq_lens": upload.ints([seq_lens[i] for i in decode_seqs], torch.int32),
            "logits_indices": upload.ints(list(logits_indices or ())),
            "prefill_query_starts": upload.ints([query_starts[i] for i in prefill_seqs], torch.int32),
            "prefill_query_lens": upload.ints([query_lens[i] for i in prefill_seqs], torch.int32),
            "prefill_seq_lens": upload.ints([seq_lens[i] for i in prefill_seqs], torch.int32),
            "input_ids": upload.ints(list(token_ids or ())),
        }
        if native_rows:
            fields["row_seqs"] = upload.ints([i for i, n in enumerate(query_lens) for _ in range(n)], torch.int32)
            fields["row_contexts"] = upload.ints([p + 1 for p in positions])
        sent = upload.send()
        t = {name: sent[index] for name, index in fields.items()}
        tables = sent[decode_tables], sent[prefill_tables]
        prefills = [
            PrefillChunk(i, query_starts[i], query_starts[i] + query_lens[i], seq_lens[i], tables[1][p])
            for p, i in enumerate(prefill_seqs)
        ]
        has_prefill = bool(prefill_seqs)
        return cls(
            slot_mapping=t["slot_mapping"],
            positions=t["positions"],
            query_lens=list(query_lens),
            seq_lens=list(seq_lens),
            query_starts=query_starts,
            prefills=prefills,
            decode_rows=t["decode_rows"] if decode_seqs else None,
            decode_seq_indices=decode_seqs,
            decode_block_tables=tables[0] if decode_seqs else None,
            decode_seq_lens=t["decode_seq_lens"] if decode_seqs else None,
            is_pure_decode=not has_prefill,
            logits_indices=None if logits_indices is None else t["logits_indices"],
            prefill_block_tables=tables[1] if has_prefill else None,
            prefill_query_starts=t["prefill_query_starts"] if has_prefill else None,
            prefill_query_lens=t["prefill_query_lens"] if has_prefill else None,
            prefill_seq_lens=t["prefill_seq_lens"] if has_prefill else None,
            attention_requests={i: frozenset(layers) for i, layers in (attention_requests or {}).items()},
            attention_rows=dict(attention_rows or {}),
            input_ids=None if token_ids is None else t["input_ids"],
            batch_invariant=batch_invariant,
            row_tables=sent[all_tables] if native_rows else None,
            row_seqs=t.get("row_seqs"),
            row_contexts=t.get("row_contexts"),
        )

    def cpu_layouts(
        self, num_heads: int, layer_cache: torch.Tensor, *, decode_only: bool = False, window: int | None = None
    ) -> list[cpu_sparse.RowLayout]:
        """The sparse layouts of every row (or of the decode rows alone), built on first use and
        shared by every layer with the same sliding ``window`` (None: the whole context)."""
        _, num_blocks, block_size, num_kv_heads, _ = layer_cache.shape
        key = (num_heads, num_kv_heads, num_blocks * block_size, decode_only, window)
        if key not in self._cpu_layouts:
            self._cpu_layouts[key] = cpu_sparse.build_row_layouts(
                self._decode_rows() if decode_only else self._all_rows(),
                block_size=block_size,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                num_slots=num_blocks * block_size,
                window=window,
            )
        return self._cpu_layouts[key]

    def _decode_rows(self) -> list[cpu_sparse.QueryRows]:
        assert self.decode_block_tables is not None
        return [
            cpu_sparse.QueryRows(table, length, 1)
            for table, length in zip(self.decode_block_tables, self.decode_seq_lens_host, strict=True)
        ]

    def _all_rows(self) -> list[cpu_sparse.QueryRows]:
        tables = {chunk.seq_index: chunk.block_table for chunk in self.prefills}
        if self.decode_block_tables is not None:
            tables.update(zip(self.decode_seq_indices, self.decode_block_tables, strict=False))
        return [
            cpu_sparse.QueryRows(tables[i], seq_len, query_len)
            for i, (seq_len, query_len) in enumerate(zip(self.seq_lens, self.query_lens, strict=True))
        ]

    @property
    def decode_seq_lens_host(self) -> list[int]:
        """Each decode row's context length, from the host lists (padding rows: 0)."""
        assert self.decode_block_tables is not None
        lens = [self.seq_lens[i] for i in self.decode_seq_indices]
        return lens + [0] * (self.decode_block_tables.shape[0] - len(lens))

    def block_table(self, seq_index: int) -> torch.Tensor:
        """(max_blocks,) int32 block ids of one sequence."""
        if seq_index in self.decode_seq_indices:
            assert self.decode_block_tables is not None
            return self.decode_block_tables[self.decode_seq_indices.index(seq_index)]
        return next(c.block_table for c in self.prefills if c.seq_index == seq_index)


def _check(
    block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int], query_lens: Sequence[int], block_size: int
) -> None:
    if not (len(block_tables) == len(seq_lens) == len(query_lens)):
        raise ValueError("block_tables, seq_lens and query_lens must have one entry per sequence")
    for i, (table, seq_len, query_len) in enumerate(zip(block_tables, seq_lens, query_lens, strict=True)):
        if not 0 < query_len <= seq_len:
            raise ValueError(f"sequence {i}: need 0 < query_len ({query_len}) <= seq_len ({seq_len})")
        if len(table) * block_size < seq_len:
            raise ValueError(f"sequence {i}: {len(table)} blocks of {block_size} cannot hold {seq_len} tokens")


class _Upload:
    """A step's integer inputs, gathered on the host and sent to the device together.

    On CPU each part is simply a tensor. On CUDA the parts are packed into one pinned int64
    buffer and sent with one non-blocking copy (not one blocking copy per field), then cut
    into views of the dtypes the kernels take.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.parts: list[tuple[torch.Tensor, torch.dtype]] = []

    def ints(self, values: list[int], dtype: torch.dtype = torch.long) -> int:
        self.parts.append((torch.tensor(values, dtype=torch.long), dtype))
        return len(self.parts) - 1

    def table(
        self,
        block_tables: Sequence[Sequence[int]],
        seq_lens: Sequence[int],
        seqs: list[int],
        block_size: int,
        rows: torch.Tensor | None,
    ) -> int:
        """(len(seqs), max_blocks) int32: the blocks each sequence's context uses, padded with block 0."""
        width = max((-(-seq_lens[i] // block_size) for i in seqs), default=0)
        if rows is not None:  # kept from step to step: slice, do not rebuild
            table = rows[torch.tensor(seqs, dtype=torch.long), :width] if seqs else rows[:0, :width]
            self.parts.append((table, torch.int32))
        else:
            padded = [list(block_tables[i][:width]) + [0] * (width - len(block_tables[i][:width])) for i in seqs]
            self.parts.append((torch.tensor(padded, dtype=torch.int32).view(len(seqs), width), torch.int32))
        return len(self.parts) - 1

    def send(self) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return [part.to(dtype) for part, dtype in self.parts]
        flat = [part.reshape(-1).long() for part, _ in self.parts]
        host = torch.cat(flat).pin_memory() if flat else torch.empty(0, dtype=torch.long)
        on_device = host.to(self.device, non_blocking=True)
        out, start = [], 0
        for (part, dtype), f in zip(self.parts, flat, strict=True):
            out.append(on_device[start : start + f.numel()].view(part.shape).to(dtype))
            start += f.numel()
        return out


def _slots(table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions [start, end): one range per block, not one lookup per token."""
    out: list[int] = []
    for index in range(start // block_size, -(-end // block_size)):
        base = table[index] * block_size - index * block_size
        out.extend(range(base + max(start, index * block_size), base + min(end, (index + 1) * block_size)))
    return out


def kv_cache_dtype(dtype: torch.dtype, device: torch.device, *, batch_invariant: bool) -> torch.dtype:
    """The dtype the paged cache keeps K/V in: the model's. The batch-invariant CPU path's ATen
    fallback (no native kernels) reads float32 only: there a narrower model's K/V are held exactly, upcast."""
    fallback = batch_invariant and device.type == "cpu" and not cpu_native.available()
    if fallback and dtype not in cpu_sparse.SPARSE_DTYPES:
        return torch.float32
    return dtype


def write_kv(layer_cache: torch.Tensor, slot_mapping: torch.Tensor, kv: torch.Tensor) -> None:
    """Store new keys and values (T, 2, Hkv, D) at their slots of one layer's cache, in one copy."""
    flat = layer_cache.view(2, -1, *layer_cache.shape[-2:])  # (2, num_slots, Hkv, D)
    if kv.dtype != flat.dtype:
        kv = kv.to(flat.dtype)  # a wider cache holds them exactly
    flat.index_copy_(1, slot_mapping, kv.transpose(0, 1))


def native_rows(meta: AttentionMetadata) -> bool:
    """Whether this step's CPU rows run on the native kernels (model/kernels/cpu_native.py): build()
    gives their arguments exactly when they do."""
    return meta.row_tables is not None


def paged_attention(
    q: torch.Tensor,
    kv: torch.Tensor | None,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    layer_index: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of new tokens over their sequences' cached context (or its last ``window`` positions),
    scores soft-capped to (-softcap, softcap) before the softmax when given.

    q: (T, H, D); kv: (T, 2, Hkv, D) the new keys (already rotated) and values, or None where they
    are in the cache already (``rope_write_kv``). Returns (T, H, D).
    """
    if kv is not None:
        write_kv(layer_cache, meta.slot_mapping, kv)
    if native_rows(meta):
        assert meta.row_tables is not None and meta.row_seqs is not None and meta.row_contexts is not None
        out = torch.ops.attnserve.row_attention(
            q, layer_cache, meta.row_tables, meta.row_seqs, meta.row_contexts, scale, window or 0, softcap or 0.0
        )
    elif meta.batch_invariant and not q.is_cuda:
        layouts = meta.cpu_layouts(q.shape[1], layer_cache, window=window)
        out = cpu_sparse.sparse_attention(q, layer_cache, layouts, scale, softcap=softcap)
    elif (window is not None or softcap is not None) and not q.is_cuda:
        out = explicit_sequences(q, layer_cache, meta, scale=scale, window=window, softcap=softcap)
    elif meta.is_pure_decode:
        out = decode_attention(q, layer_cache, meta, scale, window=window, softcap=softcap)
    else:
        assert kv is not None
        out = torch.empty_like(q)
        if meta.decode_rows is not None:
            rows = q[meta.decode_rows]
            out[meta.decode_rows] = decode_attention(rows, layer_cache, meta, scale, window=window, softcap=softcap)
        prefill_attention(q, kv[:, 0], kv[:, 1], layer_cache, meta, scale, out=out, window=window, softcap=softcap)
    capture_queries(q, meta, layer_index)
    return out


def capture_queries(q: torch.Tensor, meta: AttentionMetadata, layer_index: int) -> None:
    """Keep the asked rows' queries (T, H, D) of this layer for their weights after the step."""
    if meta.query_sink is not None:
        meta.query_sink[layer_index].copy_(q)
        return
    for seq, layers in meta.attention_requests.items():
        if layer_index in layers:
            first, count = meta.attention_rows.get(seq, (0, meta.query_lens[seq]))
            start = meta.query_starts[seq] + first
            meta.captured_queries[(seq, layer_index)] = q[start : start + count].clone()


def captured_attention_weights(
    meta: AttentionMetadata,
    layer_cache: torch.Tensor,
    *,
    seq: int,
    layer: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[int, torch.Tensor]:
    """(position of the first captured row, weights (H, n, position + n) float32) of one sequence at one
    layer, from its captured queries and the cache: row i sees positions 0 .. position + i."""
    first, _ = meta.attention_rows.get(seq, (0, meta.query_lens[seq]))
    position = meta.seq_lens[seq] - meta.query_lens[seq] + first
    q = meta.captured_queries[(seq, layer)]
    table = meta.block_table(seq)
    return position, attention_weights_from_cache(
        q, layer_cache, table, start=position, scale=scale, window=window, softcap=softcap
    )


def explicit_sequences(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """(T, H, D): every sequence's rows through the explicit weights (window and soft-cap applied), in
    float32. The CPU path for windowed or soft-capped layers where batch invariance is off."""
    out = torch.empty_like(q)
    for seq, (start, n) in enumerate(zip(meta.query_starts, meta.query_lens, strict=True)):
        k, v = context_kv(layer_cache, meta.block_table(seq), meta.seq_lens[seq])  # (Hkv, L, D)
        rows, _ = explicit_attention(
            q[start : start + n].transpose(0, 1), k, v, scale=scale, window=window, softcap=softcap
        )
        out[start : start + n] = rows.transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """(Bd, H, D): the decode rows' attention over their cached context, K/V read in place (``window``
    and ``softcap``: on CUDA; the CPU paths take them elsewhere).

    bench/step_bench.py swaps this function for the old copying path to compare the two.
    """
    assert meta.decode_block_tables is not None and meta.decode_seq_lens is not None
    if q.is_cuda:
        from attnserve.model.kernels import triton_decode

        return triton_decode.split_paged_decode_attention(
            q, layer_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, window=window, softcap=softcap
        )
    if layer_cache.dtype not in cpu_sparse.SPARSE_DTYPES:
        return cpu_sparse.per_sequence_decode_attention(
            q, layer_cache, meta.decode_block_tables, meta.decode_seq_lens_host, scale
        )
    layouts = meta.cpu_layouts(q.shape[1], layer_cache, decode_only=True)
    return paged_decode_attention(
        q, layer_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, cpu_layouts=layouts
    )


def paged_decode_attention(
    q: torch.Tensor,  # (B, H, D)
    layer_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    seq_lens: torch.Tensor,  # (B,) int32; 0 = padding row
    scale: float,
    *,
    cpu_layouts: list[cpu_sparse.RowLayout] | None = None,
) -> torch.Tensor:
    """One query per sequence over its cached context, reading K/V in place. Returns (B, H, D).

    On CPU, pass the step's ``cpu_layouts`` (shared by all layers); without them they are built here.
    """
    if q.is_cuda:
        from attnserve.model.kernels import triton_decode  # Triton is needed (and present) only with CUDA

        return triton_decode.split_paged_decode_attention(q, layer_cache, block_tables, seq_lens, scale)
    if layer_cache.dtype not in cpu_sparse.SPARSE_DTYPES:
        return cpu_sparse.per_sequence_decode_attention(q, layer_cache, block_tables, seq_lens.tolist(), scale)
    if cpu_layouts is None:
        _, num_blocks, block_size, num_kv_heads, _ = layer_cache.shape
        cpu_layouts = cpu_sparse.build_row_layouts(
            [cpu_sparse.QueryRows(t, n, 1) for t, n in zip(block_tables, seq_lens.tolist(), strict=True)],
            block_size=block_size,
            num_heads=q.shape[1],
            num_kv_heads=num_kv_heads,
            num_slots=num_blocks * block_size,
        )
    return cpu_sparse.sparse_attention(q, layer_cache, cpu_layouts, scale)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    out: torch.Tensor,
    window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Fill the prefill chunks' rows of ``out`` (T, H, D): causal within each chunk, over cached history
    (``window`` and ``softcap``: on CUDA; the CPU paths take them elsewhere)."""
    if q.is_cuda:
        from attnserve.model.kernels import triton_prefill

        assert meta.prefill_block_tables is not None
        triton_prefill.paged_prefill_attention(
            q,
            layer_cache,
            meta.prefill_block_tables,
            meta.prefill_query_starts,
            meta.prefill_query_lens,
            meta.prefill_seq_lens,
            scale,
            max_query_len=max(c.token_end - c.token_start for c in meta.prefills),
            out=out,
            window=window,
            softcap=softcap,
        )
        return
    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_end)
        if chunk.is_fresh:  # the new tokens are the whole context: no need to read the cache back
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # (Hkv, L, D)
        else:
            kp, vp = context_kv(layer_cache, chunk.block_table, chunk.seq_len)
        out[rows] = sdpa_chunk(q[rows].transpose(0, 1), kp, vp, scale=scale, is_fresh=chunk.is_fresh).transpose(0, 1)


def sdpa_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, is_fresh: bool) -> torch.Tensor:
    """One chunk on CPU: q (H, n, D) the last n of L positions in k, v (Hkv, L, D). Returns (H, n, D).

    4-D inputs with K/V repeated to H heads: CPU SDPA then takes its flash kernel; 3-D inputs
    or ``enable_gqa`` fall back to the math kernel, which materialises the scores (measured
    ~3x slower at 512 tokens).
    """
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    mask = None if is_fresh else causal_mask(q.shape[1], k.shape[1], q.device)
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=is_fresh, scale=scale)
    return o[0]


def causal_mask(num_queries: int, context_len: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """(n, L) bool: query i (the last n of L positions) may see keys up to its own position (and,
    with a sliding ``window``, none more than window - 1 before it)."""
    own = torch.arange(num_queries, device=device)[:, None] + (context_len - num_queries)
    keys = torch.arange(context_len, device=device)[None, :]
    visible = keys <= own
    return visible if window is None else visible & (keys > own - window)


def explicit_weights(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, window: int | None = None, softcap: float | None = None
) -> torch.Tensor:
    """softmax(q·Kᵀ·scale + causal mask) in float32.

    q: (H, n, D) are the last n of the L positions in k: (Hkv, L, D). Returns (H, n, L).
    """
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0).float()  # (H, L, D)
    scores = torch.matmul(q.float(), k.transpose(1, 2)) * scale  # (H, n, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device, window), float("-inf"))
    return torch.softmax(scores, dim=-1)


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·Kᵀ·scale + causal mask)·V with the weights kept.

    q: (H, n, D) are the last n of the L positions in k, v: (Hkv, L, D).
    Returns the output (H, n, D) in q's dtype and the weights (H, n, L) in float32.
    """
    weights = explicit_weights(q, k, scale=scale, window=window, softcap=softcap)
    v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0).float()  # (H, L, D)
    return torch.matmul(weights, v).to(q.dtype), weights


def attention_weights_from_cache(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_table: torch.Tensor,
    *,
    start: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention weights of queries at positions [start, start + n), keys read from the paged cache.

    q: (n, H, D), already rotated; block_table: (num_blocks,) the sequence's block ids.
    Returns (H, n, start + n) float32. Lets the runner compute asked-for weights after a
    step from the queries alone, outside any captured graph.
    """
    k, _ = context_kv(layer_cache, block_table, start + q.shape[0])  # (Hkv, L, D)
    return explicit_weights(q.transpose(0, 1), k, scale=scale, window=window, softcap=softcap)
