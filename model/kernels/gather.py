"""Copying one sequence's context out of the paged cache: for the paths that pay for it on purpose
(explicit attention weights for the requests that ask, and the per-sequence CPU fallback)."""

from __future__ import annotations

import torch


def context_kv(layer_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first ``length`` keys and values, as (Hkv, L, D) each.

    layer_cache: (2, num_blocks, block_size, Hkv, D); block_table: (>= ceil(length / block_size),) block ids.
    Whole blocks are copied (a few large copies, not one per token), then trimmed.
    """
    block_size = layer_cache.shape[2]
    blocks = block_table[: -(-length // block_size)]
    kv = layer_cache.index_select(1, blocks)  # (2, n, block_size, Hkv, D)
    kv = kv.flatten(1, 2)[:, :length].transpose(1, 2)  # (2, Hkv, L, D)
    return kv[0], kv[1]
