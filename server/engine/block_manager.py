"""The logical KV cache: fixed-size blocks, a free list, reference counts and a prefix cache.

Plain Python. The runner owns the physical tensors; this class only decides which
block numbers each request's tokens live in (its ``block_table``).

Prefix caching: once a block is full, it is registered under a SHA-256 of its tokens
chained with the key of the block before it, so the key names the whole prefix; the
chain starts from a salt naming everything else that changes a block's K/V (model,
dtype). Every hit is also checked against the tokens the block holds, so not even a
hash collision can hand one request another's KV.
A new request whose prompt starts with registered blocks shares them (reference
count + 1) instead of recomputing them. A block whose count drops to zero goes to
the tail of the free list but keeps its hash, so it can still be hit until it is
reallocated (LRU eviction from the head).

Sliding windows: where every layer of the model sees only its last ``sliding_window``
positions, a request's blocks wholly before the first position its next token can see are
released as it moves on (``release_out_of_window``), so a long generation holds a bounded
number of blocks. Their table entries become ``NULL_BLOCK`` (reserved, never handed out,
never written: a kernel that reads a whole table reads zeros there, and masks them anyway).
Released blocks are counted down like any freed block: one another request shares keeps its
K/V, and a cached one stays in the prefix cache until it is reallocated.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from attnserve.server.engine.request import Request

NULL_BLOCK = 0  # with a sliding window: the entry a released block leaves in its request's table


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()  # the tokens whose K/V it holds, while it has a hash


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a full block: SHA-256 over the previous block's key (or the salt) and its tokens.

    Python's ``hash`` of ints and tuples is neither randomised nor collision-resistant, so a
    crafted prompt could collide with another client's prefix; a cryptographic hash cannot
    be steered, and the token check on every hit covers the accidental case too.
    """
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        cache_salt: bytes = b"",
        sliding_window: int | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks} and {block_size}")
        if sliding_window is not None and (sliding_window < 1 or num_blocks < 2):
            raise ValueError(f"sliding_window must be >= 1 with >= 2 blocks, got {sliding_window}, {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Every layer's window (None: some layer sees the whole context, nothing is ever released).
        self.sliding_window = sliding_window
        # The root of every chain: what else, besides the tokens, decides a block's K/V.
        self.root_key = hashlib.sha256(b"attnserve-kv-v1\0" + cache_salt).digest()
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # head = evict first
        self._cached: dict[bytes, int] = {}  # block key -> block id
        self._hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its full blocks
        self._released: dict[str, int] = {}  # request id -> leading entries of its table released
        self._num_usable = num_blocks
        if sliding_window is not None:  # the null block: held for good, so never allocated or evicted
            self._take(NULL_BLOCK)
            self._num_usable -= 1
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of which were found

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self._num_usable

    def num_released(self, request: Request) -> int:
        """How many leading entries of the request's table were released (now NULL_BLOCK)."""
        return self._released.get(request.request_id, 0)

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
        parent = self._root(request)
        hits: list[int] = []
        for i in range(max_blocks):
            block_tokens = tokens[i * self.block_size : (i + 1) * self.block_size]
            parent = chain_hash(parent, block_tokens)
            block_id = self._cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tuple(block_tokens):
                break  # a miss, or a collision: the block holds other tokens
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
            parent = hashes[-1] if hashes else self._root(request)
            block_tokens = tokens[i * self.block_size : (i + 1) * self.block_size]
            block_hash = chain_hash(parent, block_tokens)
            hashes.append(block_hash)
            if i < self.num_released(request):
                continue  # out of the window already (the chain goes on through its key)
            block = self.blocks[request.block_table[i]]
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash
                block.token_ids = tuple(block_tokens)
                self._cached[block_hash] = block.block_id

    def _root(self, request: Request) -> bytes:
        """The chain's start: the server's root, or for a request whose K/V its interventions changed,
        a root of their own (it never shares blocks with plain requests, in either direction)."""
        salt = request.params.kv_salt
        return self.root_key if not salt else hashlib.sha256(self.root_key + salt).digest()

    def release_out_of_window(self, request: Request) -> int:
        """With a sliding window on every layer: release the request's blocks wholly before the first
        position its next token sees (that token sits at ``num_computed_tokens``); call it once the
        computed tokens' blocks are cached. Returns how many blocks it released."""
        if self.sliding_window is None:
            return 0
        first_visible = max(request.num_computed_tokens - self.sliding_window + 1, 0)
        start = self.num_released(request)
        end = min(first_visible // self.block_size, len(request.block_table))
        for i in range(start, end):
            self._release(request.block_table[i])
            request.block_table[i] = NULL_BLOCK
        if end <= start:
            return 0
        self._released[request.request_id] = end
        return end - start

    def free(self, request: Request) -> None:
        """Release the request's blocks (last first, so a prefix's tail is evicted before its head)."""
        released = self._released.pop(request.request_id, 0)
        for block_id in reversed(request.block_table[released:]):
            self._release(block_id)
        request.block_table = []
        self._hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash, block.token_ids = None, ()
        self._cached.clear()

    # ------------------------------------------------------------------ helpers
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free.pop(block_id, None)
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.block_hash is None:
                self._free.move_to_end(block_id, last=False)  # uncached blocks are reused first

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
