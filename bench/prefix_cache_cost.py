"""Host cost of the prefix cache's keys: SHA-256 chained per block, and a full hit with its token check.

    python bench/prefix_cache_cost.py

Per 1,000 prompt tokens, block size 16, median of 5 rounds of 1,000 prompts each.
"""

from __future__ import annotations

import random
import statistics
import time

from attnserve.server.engine.block_manager import BlockManager, chain_hash
from attnserve.server.engine.request import Request, SamplingParams

BLOCK = 16
TOKENS = [random.Random(0).randrange(49152) for _ in range(1024)]


def hash_prompt() -> None:
    key = b"\0" * 32
    for i in range(0, len(TOKENS), BLOCK):
        key = chain_hash(key, TOKENS[i : i + BLOCK])


def full_hit(manager: BlockManager, i: int) -> None:
    request = Request(f"q{i}", [*TOKENS, 1], SamplingParams(), arrival_time=0.0)
    assert manager.match_prefix(request) == len(TOKENS)
    manager.free(request)


def per_1000_tokens(fn, rounds: int = 5, n: int = 1000) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples) * 1e6 * 1000 / len(TOKENS)


def main() -> None:
    manager = BlockManager(4096, BLOCK)
    warm = Request("warm", [*TOKENS, 1], SamplingParams(), arrival_time=0.0)
    manager.allocate_slots(warm, len(TOKENS) + 1)
    warm.num_computed_tokens = len(TOKENS) + 1
    manager.cache_full_blocks(warm)
    print(f"SHA-256 keys of a prompt: {per_1000_tokens(lambda _: hash_prompt()):.0f} us per 1,000 tokens")
    hit = per_1000_tokens(lambda i: full_hit(manager, i))
    print(f"full prefix hit (keys + token check): {hit:.0f} us per 1,000 tokens")


if __name__ == "__main__":
    main()
