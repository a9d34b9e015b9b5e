"""Paged attention over a flattened batch of tokens from several sequences.

A step's batch is the concatenation of each sequence's *new* tokens (a prefill
chunk, or one token when decoding). Every new token's K/V is first written to its
cache slot; then each sequence attends to its whole history, read back through
its block table. Decode sequences (one query each) are attended together in one
batched SDPA call with a padding mask; prefill chunks are attended one sequence
at a time, since each is already a large matrix product.

The fused path (``scaled_dot_product_attention``) never materialises weights. For
the sequences that ask, the explicit path computes ``softmax(q·Kᵀ/√d + mask)`` for
the requested layers only and hands the weights back through the metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# (sequence index, layer index) -> attention weights (num_heads, query_len, context_len), float32.
CapturedAttention = dict[tuple[int, int], torch.Tensor]


@dataclass
class PrefillChunk:
    """One sequence whose step has more than one new token."""

    seq_index: int
    token_start: int  # row range of its new tokens in the flattened batch
    token_end: int
    context_slots: torch.Tensor  # (L,) cache slots of its whole context, in order
    is_fresh: bool  # no cached history: the new tokens are the whole context


@dataclass
class AttentionMetadata:
    """How a flattened batch maps onto sequences and onto the paged cache.

    Built once per step with :meth:`build` and shared by every layer.
    """

    slot_mapping: torch.Tensor  # (T,) cache slot for each new token's K/V
    positions: torch.Tensor  # (T,) position of each new token in its sequence
    query_lens: list[int]
    seq_lens: list[int]  # context length of each sequence after this step
    prefills: list[PrefillChunk]
    decode_rows: torch.Tensor | None  # (Bd,) batch rows of the one-token sequences
    decode_seq_indices: list[int]
    decode_block_tables: torch.Tensor | None  # (Bd, max_blocks) block ids, padded with block 0
    decode_mask: torch.Tensor | None  # (Bd, 1, 1, max_blocks * block_size) True where a key is real; None = all
    is_pure_decode: bool  # every sequence decodes one token: batch rows are the decode rows
    logits_indices: torch.Tensor | None  # rows to compute logits for; None = every row
    # Explicit attention: sequence index -> layers whose weights to return.
    attention_requests: Mapping[int, frozenset[int]] = field(default_factory=dict)
    captured_attention: CapturedAttention = field(default_factory=dict)

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
    ) -> AttentionMetadata:
        """Derive slots, positions and per-group layouts from block tables.

        ``seq_lens[i]`` counts sequence ``i``'s tokens once this step's
        ``query_lens[i]`` new tokens are in the cache; its block table must cover them.
        """
        if not (len(block_tables) == len(seq_lens) == len(query_lens)):
            raise ValueError("block_tables, seq_lens and query_lens must have one entry per sequence")
        context_slots: list[torch.Tensor] = []
        for i, (table, seq_len, query_len) in enumerate(zip(block_tables, seq_lens, query_lens, strict=True)):
            if not 0 < query_len <= seq_len:
                raise ValueError(f"sequence {i}: need 0 < query_len ({query_len}) <= seq_len ({seq_len})")
            if len(table) * block_size < seq_len:
                raise ValueError(f"sequence {i}: {len(table)} blocks of {block_size} cannot hold {seq_len} tokens")
            blocks = torch.tensor(table, dtype=torch.long)
            slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:seq_len]
            context_slots.append(slots)

        slot_mapping = torch.cat([s[seq - q :] for s, seq, q in zip(context_slots, seq_lens, query_lens, strict=True)])
        positions = torch.cat([torch.arange(seq - q, seq) for seq, q in zip(seq_lens, query_lens, strict=True)])

        prefills: list[PrefillChunk] = []
        decode_rows: list[int] = []
        decode_seqs: list[int] = []
        start = 0
        for i, q in enumerate(query_lens):
            if q == 1:
                decode_rows.append(start)
                decode_seqs.append(i)
            else:
                prefills.append(PrefillChunk(i, start, start + q, context_slots[i].to(device), q == seq_lens[i]))
            start += q

        decode_tables = decode_mask = rows = None
        if decode_seqs:
            # Decode reads whole blocks (a contiguous copy each), not single slots: far fewer,
            # larger copies. Padding blocks are masked out.
            lens = torch.tensor([seq_lens[i] for i in decode_seqs])
            num_blocks = [-(-seq_lens[i] // block_size) for i in decode_seqs]
            padded = torch.zeros(len(decode_seqs), max(num_blocks), dtype=torch.long)
            for row, (i, n) in enumerate(zip(decode_seqs, num_blocks, strict=True)):
                padded[row, :n] = torch.tensor(block_tables[i][:n])
            decode_tables = padded.to(device)
            width = max(num_blocks) * block_size
            if bool((lens < width).any()):
                decode_mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :].to(device)
            rows = torch.tensor(decode_rows, dtype=torch.long, device=device)

        return cls(
            slot_mapping=slot_mapping.to(device),
            positions=positions.to(device),
            query_lens=list(query_lens),
            seq_lens=list(seq_lens),
            prefills=prefills,
            decode_rows=rows,
            decode_seq_indices=decode_seqs,
            decode_block_tables=decode_tables,
            is_pure_decode=not prefills,
            decode_mask=decode_mask,
            logits_indices=None
            if logits_indices is None
            else torch.tensor(logits_indices, dtype=torch.long, device=device),
            attention_requests={i: frozenset(layers) for i, layers in (attention_requests or {}).items()},
        )


def write_kv(layer_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store new keys/values (T, Hkv, D) at their slots of one layer's cache."""
    flat = layer_cache.view(2, -1, *layer_cache.shape[-2:])  # (2, num_slots, Hkv, D)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    layer_index: int,
    scale: float,
) -> torch.Tensor:
    """Attention of new tokens over their sequences' cached context.

    q: (T, H, D); k, v: (T, Hkv, D), already rotated. Returns (T, H, D).
    """
    write_kv(layer_cache, meta.slot_mapping, k, v)
    flat = layer_cache.view(2, -1, *layer_cache.shape[-2:])  # (2, num_slots, Hkv, D)

    if meta.decode_rows is not None:
        assert meta.decode_block_tables is not None
        tables = meta.decode_block_tables
        bd, width = tables.shape[0], tables.shape[1] * layer_cache.shape[2]
        qd = (q if meta.is_pure_decode else q[meta.decode_rows]).unsqueeze(2)  # (Bd, H, 1, D)
        kv = layer_cache[:, tables].view(2, bd, width, *k.shape[1:]).transpose(2, 3)  # (2, Bd, Hkv, W, D)
        kd, vd = kv[0], kv[1]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        if meta.is_pure_decode:
            out = od.squeeze(2)
        else:
            out = torch.empty_like(q)
            out[meta.decode_rows] = od.squeeze(2)
        for row, seq in enumerate(meta.decode_seq_indices):
            if layer_index in meta.attention_requests.get(seq, ()):
                length = meta.seq_lens[seq]
                o, w = explicit_attention(qd[row], kd[row, :, :length], vd[row, :, :length], scale=scale)
                meta.captured_attention[(seq, layer_index)] = w
                out[meta.decode_rows[row]] = o.squeeze(1)
    else:
        out = torch.empty_like(q)

    for chunk in meta.prefills:
        rows = slice(chunk.token_start, chunk.token_end)
        qp = q[rows].transpose(0, 1)  # (H, n, D)
        if chunk.is_fresh:  # the new tokens are the whole context: no need to read the cache back
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # (Hkv, L, D)
        else:
            kp = flat[0][chunk.context_slots].transpose(0, 1)
            vp = flat[1][chunk.context_slots].transpose(0, 1)
        if layer_index in meta.attention_requests.get(chunk.seq_index, ()):
            o, w = explicit_attention(qp, kp, vp, scale=scale)
            meta.captured_attention[(chunk.seq_index, layer_index)] = w
        elif chunk.is_fresh:
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=causal_mask(qp.shape[1], kp.shape[1], q.device), scale=scale, enable_gqa=True
            )
        out[rows] = o.transpose(0, 1)
    return out


def causal_mask(num_queries: int, context_len: int, device: torch.device) -> torch.Tensor:
    """(n, L) bool: query i (the last n of L positions) may see keys up to its own position."""
    offset = context_len - num_queries
    return (
        torch.arange(context_len, device=device)[None, :] <= torch.arange(num_queries, device=device)[:, None] + offset
    )


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·Kᵀ·scale + causal mask)·V with the weights kept.

    q: (H, n, D) are the last n of the L positions in k, v: (Hkv, L, D).
    Returns the output (H, n, D) in q's dtype and the weights (H, n, L) in float32.
    """
    groups = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(groups, dim=0).float()  # (H, L, D)
    v = v.repeat_interleave(groups, dim=0).float()
    scores = torch.matmul(q.float(), k.transpose(1, 2)) * scale  # (H, n, L)
    scores = scores.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, v).to(q.dtype), weights
