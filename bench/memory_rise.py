"""Who owns the memory rise under mixed prompt lengths: the engine in-process, RSS after each batch of requests.

    python bench/memory_rise.py                       # every variant, each in a fresh process
    python bench/memory_rise.py --variant default --requests 600

Each variant runs the same requests (prompt lengths drawn from 8..--max-len, a few tokens out)
in a fresh process and prints the RSS every --every requests, then the rise from the first
report to the last. Variants change one suspect at a time:
  default          as served
  onednn-cache-8   oneDNN's primitive cache capped at 8 entries (ONEDNN_PRIMITIVE_CACHE_CAPACITY)
  arena-2          glibc malloc held to 2 arenas (MALLOC_ARENA_MAX)
  no-native        the ATen attention path instead of the native CPU kernels
  trim             malloc_trim(0) after every batch (memory glibc holds but does not use)
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import random
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "default": {},
    "onednn-cache-8": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8"},
    "arena-2": {"MALLOC_ARENA_MAX": "2"},
    "no-native": {"ATTNSERVE_NATIVE_KERNELS": "0"},
    "trim": {"ATTNSERVE_BENCH_TRIM": "1"},
}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(model: str, requests: int, every: int, max_len: int) -> None:
    import torch

    from attnserve.model.loader import load_model
    from attnserve.server.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from attnserve.server.engine.core import build_engine
    from attnserve.server.engine.request import SamplingParams

    config = EngineConfig(
        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=16),
        cache=CacheConfig(kv_cache_memory=256 << 20, enable_prefix_caching=False),
    )
    engine = build_engine(lambda: load_model(model, dtype=torch.bfloat16), config).start()
    rng = random.Random(0)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    trim = ctypes.CDLL("libc.so.6").malloc_trim if os.environ.get("ATTNSERVE_BENCH_TRIM") else None

    async def batch(n: int) -> None:
        prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(8, max_len))] for _ in range(n)]
        await asyncio.gather(*[engine.generate(p, params) for p in prompts])

    reports = []
    for done in range(0, requests, every):
        asyncio.run(batch(every))
        if trim is not None:
            trim(0)
        reports.append(rss_mb())
        print(f"  {done + every:5d} requests: RSS {reports[-1]:.0f} MB", flush=True)
    engine.shutdown(5)
    print(f"  rise after the first {every}: {reports[-1] - reports[0]:+.0f} MB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:smollm2-135m")
    p.add_argument("--variant", choices=sorted(VARIANTS), action="append")
    p.add_argument("--requests", type=int, default=480)
    p.add_argument("--every", type=int, default=48)
    p.add_argument("--max-len", type=int, default=300)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run(args.model, args.requests, args.every, args.max_len)
        return
    for name in args.variant or list(VARIANTS):
        print(f"== {name}", flush=True)
        env = {**os.environ, **VARIANTS[name]}
        argv = [sys.executable, __file__, "--child", "--model", args.model, "--requests", str(args.requests)]
        argv += ["--every", str(args.every), "--max-len", str(args.max_len)]
        subprocess.run(argv, env=env, check=True)


if __name__ == "__main__":
    main()
