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


# ------------------------------------------------------------- sliding windows
def generate(bm: BlockManager, r: Request, num_tokens: int) -> int:
    """Compute the prompt, then decode num_tokens one at a time as the scheduler does (release after
    caching); the most blocks the request held at once."""
    computed(bm, r, r.num_tokens)
    bm.release_out_of_window(r)
    most = 0
    for i in range(num_tokens):
        r.output_token_ids.append(1000 + i)
        computed(bm, r, r.num_tokens)
        bm.release_out_of_window(r)
        most = max(most, len(r.block_table) - bm.num_released(r))
    return most


def test_a_windowed_request_holds_a_bounded_number_of_blocks() -> None:
    bm = BlockManager(num_blocks=12, block_size=4, sliding_window=8)
    assert bm.num_free_blocks == 11 and bm.usage == 0.0, "the null block is reserved, and not counted as used"
    r = req("a", list(range(6)))
    most = generate(bm, r, 200)  # 206 tokens: 52 blocks' worth through 11
    # The next token at position p sees p - 7 .. p: 8 positions, over at most 3 blocks, plus the one it fills.
    assert most <= 4, most
    assert r.block_table[: bm.num_released(r)] == [block_manager.NULL_BLOCK] * bm.num_released(r)
    assert block_manager.NULL_BLOCK not in r.block_table[bm.num_released(r) :]
    assert bm.num_released(r) == (206 - 8 + 1) // 4
    bm.free(r)
    assert bm.num_free_blocks == 11 and r.block_table == []
    assert [b.ref_count for b in bm.blocks] == [1] + [0] * 11, "freed once each; the null block stays held"


def test_without_a_window_nothing_is_released() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    r = req("a", list(range(6)))
    assert generate(bm, r, 40) == 12 and bm.num_released(r) == 0
    assert bm.num_free_blocks == 64 - 12


def test_released_blocks_shared_with_another_request_keep_their_kv() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, sliding_window=4)
    shared = list(range(100, 112))  # three full blocks
    a = req("a", [*shared, 1])
    computed(bm, a, a.num_tokens)
    b = req("b", [*shared, 2])
    assert bm.match_prefix(b) == 12
    b.num_computed_tokens = 12
    prefix = list(b.block_table)
    assert bm.release_out_of_window(a) == 2  # a's next token (position 13) sees 10..13: blocks 0 and 1 go
    assert [bm.blocks[i].ref_count for i in prefix] == [1, 1, 2], "b still holds the released blocks"
    assert bm.release_out_of_window(b) == 2  # b's next token (position 12) sees 9..12
    assert [bm.blocks[i].ref_count for i in prefix] == [0, 0, 2]
    # Released, not forgotten: a third request with the same prefix still finds every block.
    c = req("c", [*shared, 3])
    assert bm.match_prefix(c) == 12 and c.block_table == prefix
    c.num_computed_tokens = 12
    bm.release_out_of_window(c)
    for r in (a, b, c):
        bm.free(r)
    assert [b.ref_count for b in bm.blocks[1:]] == [0] * 15


def test_released_blocks_are_registered_before_they_go() -> None:
    """Blocks computed and released in one go (a long chunk) keep their prefix-cache keys."""
    bm = BlockManager(num_blocks=16, block_size=4, sliding_window=4)
    a = req("a", list(range(30)))
    computed(bm, a, 30)
    assert bm.release_out_of_window(a) == 6  # position 30 sees 27..30: blocks 0..5 go, 6 and 7 stay
    bm.free(a)
    b = req("b", [*range(30), 5])
    assert bm.match_prefix(b) == 28, "the released blocks are still cached"
