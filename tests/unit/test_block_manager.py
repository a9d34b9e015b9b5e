"""Block manager: free list, reference counts, prefix cache. Plain Python, no torch."""

from __future__ import annotations

import pytest

from attnserve.server.engine import block_manager
from attnserve.server.engine.block_manager import BlockManager, chain_hash
from attnserve.server.engine.request import Request, SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), arrival_time=0.0)


def computed(bm: BlockManager, r: Request, n: int) -> None:
    """Pretend the runner computed the first n tokens."""
    assert bm.allocate_slots(r, n - r.num_computed_tokens)
    r.num_computed_tokens = n
    bm.cache_full_blocks(r)


def test_allocate_and_free_return_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    r = req("a", list(range(10)))
    assert bm.allocate_slots(r, 10)
    assert len(r.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.allocate_slots(r, 0) and len(r.block_table) == 3
    r.num_computed_tokens = 10
    assert bm.allocate_slots(r, 2) and len(r.block_table) == 3  # 12 tokens still fit in 3 blocks
    assert bm.allocate_slots(r, 3) and len(r.block_table) == 4
    bm.free(r)
    assert bm.num_free_blocks == 8 and r.block_table == []
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_allocation_fails_cleanly_when_blocks_run_out() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    r = req("a", list(range(12)))
    assert not bm.allocate_slots(r, 12)
    assert r.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hits_share_blocks_and_are_released() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    shared = list(range(100, 108))  # two full blocks
    a = req("a", [*shared, 1, 2, 3])
    assert bm.match_prefix(a) == 0
    computed(bm, a, a.num_tokens)
    b = req("b", [*shared, 9, 9])
    hit = bm.match_prefix(b)
    assert hit == 8
    assert b.block_table == a.block_table[:2], "the shared prefix lives in the same blocks"
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    b.num_computed_tokens = hit
    assert bm.allocate_slots(b, 2)
    assert b.block_table[2] not in a.block_table
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10
    # Freed but still cached: a third request hits without anyone holding the blocks.
    c = req("c", [*shared, 5])
    assert bm.match_prefix(c) == 8
    assert bm.num_prefix_hits == 16


def test_prefix_match_never_covers_the_last_token() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = req("a", list(range(8)))
    computed(bm, a, 8)
    b = req("b", list(range(8)))  # identical, exactly two blocks
    assert bm.match_prefix(b) == 4  # the last block is recomputed so its logits exist


def test_different_prefix_same_block_tokens_do_not_hit() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    computed(bm, a, 9)
    b = req("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])  # second block equal, first differs: chained hash differs
    assert bm.match_prefix(b) == 0


def test_cached_blocks_are_evicted_last_and_then_forgotten() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    computed(bm, a, 5)
    bm.free(a)  # blocks for [1,2] and [3,4] cached, [5] not
    filler = req("f", [7, 7])
    assert bm.allocate_slots(filler, 2)
    assert filler.block_table[0] not in (bm._cached.values()), "an uncached block is reused first"
    bm.free(filler)
    big = req("g", [8] * 6)
    assert bm.allocate_slots(big, 6)  # needs every block: cached ones are evicted
    assert bm._cached == {}
    bm.free(big)
    assert bm.match_prefix(req("h", [1, 2, 3, 4, 5])) == 0


def test_prefix_keys_are_sha256_chained_from_a_salt() -> None:
    a, b = BlockManager(8, 4, cache_salt=b"model-a|bf16"), BlockManager(8, 4, cache_salt=b"model-a|fp32")
    tokens = list(range(8))
    assert chain_hash(a.root_key, tokens[:4]) != chain_hash(b.root_key, tokens[:4])  # dtype changes K/V
    key = chain_hash(a.root_key, tokens[:4])
    assert len(key) == 32 and chain_hash(key, tokens[4:]) != chain_hash(a.root_key, tokens[4:])


def test_a_forced_hash_collision_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key collides: the token check alone must keep the second prompt off the first's blocks."""
    monkeypatch.setattr(block_manager, "chain_hash", lambda parent, token_ids: b"\0" * 32)
    bm = BlockManager(num_blocks=10, block_size=4)
    first = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    computed(bm, first, 9)
    assert bm.blocks[first.block_table[0]].block_hash == b"\0" * 32  # registered under the colliding key
    second = req("b", [10, 11, 12, 13, 14, 15, 16, 17, 18])
    assert bm.match_prefix(second) == 0 and second.block_table == []
    same = req("c", [1, 2, 3, 4, 99, 98, 97, 96, 95])
    assert bm.match_prefix(same) == 4 and same.block_table == first.block_table[:1]  # true hits still hit
