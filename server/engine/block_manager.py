"""The logical KV cache: fixed-size blocks, a free list, reference counts and a prefix cache.

Plain Python. The runner owns the physical tensors; this class only decides which
block numbers each request's tokens live in (its ``block_table``).

Prefix caching: once a block is full, it is registered under a hash of its tokens
chained with the hash of the block before it, so the hash names the whole prefix.
A new request whose prompt starts with registered blocks shares them (reference
count + 1) instead of recomputing them. A block whose count drops to zero goes to
the tail of the free list but keeps its hash, so it can still be hit until it is
reallocated (LRU eviction from the head).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from attnserve.server.engine.request import Request


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


def chain_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    return hash((parent, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # head = evict first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._hashes: dict[str, list[int]] = {}  # request id -> hashes of its full blocks
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of which were found

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --------------------------------------------------------------- allocation
    def match_prefix(self, request: Request) -> int:
        """Attach the cached blocks that start the request's tokens; return how many tokens they cover.

        Only whole blocks match, and never the last token: its logits are needed,
        so at least one token is always computed.
        """
        assert not request.block_table, "prefix matching is for a request holding no blocks"
        if not self.enable_prefix_caching:
            return 0
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        parent: int | None = None
        hits: list[int] = []
        for i in range(max_blocks):
            parent = chain_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        for block_id in hits:
            self._take(block_id)
        request.block_table = hits
        self._hashes[request.request_id] = [b for b in (self.blocks[i].block_hash for i in hits) if b is not None]
        self.num_prefix_queries += len(tokens)
        self.num_prefix_hits += len(hits) * self.block_size
        return len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the block table to hold ``num_computed_tokens + num_new_tokens``; False if blocks run out."""
        needed = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_table)
        if needed > len(self._free):
            return False
        for _ in range(max(needed, 0)):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._take(block_id)
            request.block_table.append(block_id)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes.setdefault(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        tokens = None
        for i in range(len(hashes), num_full):
            tokens = tokens or request.all_token_ids
            parent = hashes[-1] if hashes else None
            block_hash = chain_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            hashes.append(block_hash)
            block = self.blocks[request.block_table[i]]
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash] = block.block_id

    def free(self, request: Request) -> None:
        """Release the request's blocks (last first, so a prefix's tail is evicted before its head)."""
        for block_id in reversed(request.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)  # uncached blocks are reused first
        request.block_table = []
        self._hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()

    # ------------------------------------------------------------------ helpers
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free.pop(block_id, None)
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
