"""The physical paged KV cache: one tensor per layer, addressed by slot.

Layout per layer: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``; index 0
holds keys, 1 values. A *slot* is ``block_id * block_size + offset``, so the
flattened view ``(2, num_blocks * block_size, num_kv_heads, head_dim)`` is
addressed directly by the slot numbers the block manager hands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attnserve.model.attention import kv_cache_dtype
from attnserve.model.config import ModelConfig

if TYPE_CHECKING:
    from attnserve.model.llama import LlamaForCausalLM


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers (keys and values)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element_size


@dataclass
class KVCache:
    """Per-layer K/V tensors of a paged cache."""

    layers: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(
        cls, config: ModelConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks} and {block_size}")
        shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)], block_size)

    @classmethod
    def for_model(
        cls, model: LlamaForCausalLM, *, num_blocks: int, block_size: int, batch_invariant: bool = True
    ) -> KVCache:
        """A cache for ``model`` on its device, in the dtype its attention path reads (kv_cache_dtype)."""
        dtype = kv_cache_dtype(model.dtype, model.device, batch_invariant=batch_invariant)
        return cls.allocate(
            model.local_config, num_blocks=num_blocks, block_size=block_size, dtype=dtype, device=model.device
        )

    @property
    def num_blocks(self) -> int:
        return self.layers[0].shape[1]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)
