"""Decode steps on static inputs, padded to bucket sizes, replayed from CUDA graphs on a GPU.

A pure-decode step (every request computes one token) has one fixed shape per batch size.
Batches are padded to a bucket (1, 2, 4, 8, 16, 32, ... max_num_seqs); each bucket's
forward is captured once at warm-up, reading its inputs from preallocated tensors that each
step fills in place. Padding rows read no context (length 0) and write their K/V to a
scratch slot the block manager never hands out, so they touch nobody's cache.

Attention requests stay in the graph: every layer copies all rows' queries into a static
buffer (a few KB per step), and the runner computes the asked rows' weights from the paged
cache after the replay.

Without CUDA the same class runs the padded static path eagerly (``capture=False``): that is
how its padding, scratch slot and query buffer are tested token for token on CPU.
"""

from __future__ import annotations

import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.kv_cache import KVCache
from attnserve.model.llama import LlamaForCausalLM


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... up to max_num_seqs (itself included)."""
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return [*buckets, max_num_seqs]


class GraphDecode:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        *,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        scratch_slot: int,
        capture: bool,
        batch_invariant: bool = True,
    ) -> None:
        self.model, self.kv_cache, self.scratch_slot = model, kv_cache, scratch_slot
        self.batch_invariant = batch_invariant
        self.buckets = decode_buckets(max_num_seqs)
        size, device, c = self.buckets[-1], model.device, model.local_config
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.queries = torch.zeros(c.num_layers, size, c.num_heads, c.head_dim, dtype=model.dtype, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def can_run(self, meta: AttentionMetadata) -> bool:
        """A pure decode whose batch fits a bucket, with logits for every row in order, no hooks."""
        table = meta.decode_block_tables
        return (
            meta.is_pure_decode
            and not meta.hooks
            and self.bucket(len(meta.seq_lens)) is not None
            and table is not None
            and table.shape[1] <= self.block_tables.shape[1]
            and meta.logits_indices is not None
            and meta.logits_indices.shape[0] == len(meta.seq_lens)
        )

    @torch.inference_mode()
    def run(self, meta: AttentionMetadata, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of a pure-decode step described by the step's own metadata."""
        batch = len(meta.seq_lens)
        size = self.bucket(batch)
        assert size is not None and meta.decode_block_tables is not None and meta.decode_seq_lens is not None
        width = meta.decode_block_tables.shape[1]
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(meta.positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.block_tables[:batch, :width].copy_(meta.decode_block_tables)
        self.seq_lens[:batch].copy_(meta.decode_seq_lens)
        self._pad(batch, size, width)
        if size in self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
        else:
            logits = self._forward(size, seq_lens_host=[*meta.seq_lens, *[0] * (size - batch)])
        for seq, layers in meta.attention_requests.items():  # the asked rows' queries, from the buffer
            for layer in layers:
                meta.captured_queries[(seq, layer)] = self.queries[layer, seq : seq + 1].clone()
        return logits[:batch]

    def _pad(self, batch: int, size: int, width: int) -> None:
        """Rows past the batch: no context, K/V to the scratch slot; columns past the width: block 0."""
        self.input_ids[batch:size].zero_()
        self.positions[batch:size].zero_()
        self.slot_mapping[batch:size].fill_(self.scratch_slot)
        self.seq_lens[batch:size].zero_()
        self.block_tables[batch:size].zero_()
        self.block_tables[:batch, width:].zero_()

    def _static_meta(self, size: int, seq_lens_host: list[int]) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            positions=self.positions[:size],
            query_lens=[1] * size,
            seq_lens=seq_lens_host,
            query_starts=list(range(size)),
            prefills=[],
            decode_rows=None,
            decode_seq_indices=list(range(size)),
            decode_block_tables=self.block_tables[:size],
            decode_seq_lens=self.seq_lens[:size],
            is_pure_decode=True,
            logits_indices=None,
            query_sink=self.queries[:, :size],
            batch_invariant=self.batch_invariant,
        )

    def _forward(self, size: int, seq_lens_host: list[int]) -> torch.Tensor:
        meta = self._static_meta(size, seq_lens_host)
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_cache, meta)

    def _capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool."""
        pool = None
        for size in reversed(self.buckets):
            self._pad(0, size, 0)
            with torch.inference_mode():
                self._forward(size, [0] * size)  # compiles the kernels and fills lazy tables outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size, [0] * size)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
