"""RSS over many sequential requests: the KV cache is allocated once, nothing grows.

python bench/rss_soak.py --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from pathlib import Path

import torch

from attnserve.model.fetch import default_model_path
from attnserve.model.loader import load_model, parse_dtype
from attnserve.server.engine.config import CacheConfig, EngineConfig
from attnserve.server.engine.core import Engine
from attnserve.server.engine.request import SamplingParams


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=parse_dtype(args.dtype))
    engine = Engine(loaded, EngineConfig(cache=CacheConfig(kv_cache_memory=256 << 20))).start()
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)

    async def run() -> None:
        start = time.perf_counter()
        for i in range(args.requests):
            prompt = torch.randint(100, 40000, (int(torch.randint(8, 64, (1,), generator=gen)),), generator=gen)
            out = await engine.generate(prompt.tolist(), params)
            assert len(out.token_ids) == args.max_tokens
            if i + 1 in (10, 100, 250, 500, 750, 1000) or i + 1 == args.requests:
                print(
                    f"after {i + 1:5d} requests: RSS {rss_mib():7.1f} MiB  "
                    f"({time.perf_counter() - start:.0f}s, free blocks {engine.block_manager.num_free_blocks}"
                    f"/{engine.runner.num_blocks})",
                    flush=True,
                )

    asyncio.run(run())
    engine.shutdown(5)


if __name__ == "__main__":
    main()
