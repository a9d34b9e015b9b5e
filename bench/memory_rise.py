"""Who owns the memory rise under mixed prompt lengths, and what bounding it costs: the engine
in-process, RSS and throughput after each batch of requests.

    python bench/memory_rise.py                                  # every variant, each in a fresh process
    python bench/memory_rise.py --variant served --variant uncapped --repeat 2 --count-primitives

Each variant runs the same requests (prompt lengths drawn from 8..--max-len, --output-len tokens
out) in a fresh process and prints, every --every requests, the RSS, the batch's tokens/s
(prompt + generated) and the process's CPU time per token (steadier than tokens/s on a shared
machine). At the end: the rise from the first report to the last and the mean
tokens/s after the first batch. --count-primitives also counts oneDNN primitive creations from
ONEDNN_VERBOSE=profile_create (built anew vs found in oneDNN's cache) and the time spent building
them. --repeat runs the variant list again (A B A B): this machine's speed drifts with its load.
Variants change one suspect at a time:
  served          as served: oneDNN's and ideep's per-shape caches capped (model/native_caches.py)
  uncapped        both caches at torch's default, 1,024 primitives each (the server before the cap)
  onednn-only-8   oneDNN's cache at 8, ideep's at 1,024 (ideep still holds every primitive)
  caps-8          both caches at 8
  arena-2         as served, glibc malloc held to 2 arenas (MALLOC_ARENA_MAX)
  no-native       as served, the ATen attention path instead of the native CPU kernels
  trim            as served, malloc_trim(0) after every batch (memory glibc holds but does not use)
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

VARIANTS: dict[str, dict[str, str]] = {
    "served": {},
    "uncapped": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"},
    "onednn-only-8": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8", "LRU_CACHE_CAPACITY": "1024"},
    "caps-8": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8", "LRU_CACHE_CAPACITY": "8"},
    "arena-2": {"MALLOC_ARENA_MAX": "2"},
    "no-native": {"ATTNSERVE_NATIVE_KERNELS": "0"},
    "trim": {"ATTNSERVE_BENCH_TRIM": "1"},
}
_REPORT = re.compile(r"^\s+(\d+) requests: RSS (\d+) MB, ([\d.]+) tok/s, ([\d.]+) CPU ms/token")
_CREATE = re.compile(r"primitive,create:cache_(miss|hit),.*,([\d.]+)$")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(model: str, requests: int, every: int, max_len: int, output_len: int) -> None:
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
    caps = {k: os.environ.get(k) for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    print(f"  caches: {caps}", flush=True)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    trim = ctypes.CDLL("libc.so.6").malloc_trim if os.environ.get("ATTNSERVE_BENCH_TRIM") else None

    async def batch(n: int) -> int:
        prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(8, max_len))] for _ in range(n)]
        await asyncio.gather(*[engine.generate(p, params) for p in prompts])
        return sum(map(len, prompts)) + n * output_len

    for done in range(0, requests, every):
        start, cpu = time.perf_counter(), time.process_time()
        tokens = asyncio.run(batch(every))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if trim is not None:
            trim(0)
        print(
            f"  {done + every:5d} requests: RSS {rss_mb():.0f} MB, {tokens / elapsed:.1f} tok/s, "
            f"{cpu / tokens * 1e3:.2f} CPU ms/token",
            flush=True,
        )
    engine.shutdown(5)


def run_variant(name: str, args: argparse.Namespace) -> dict[str, float]:
    """One variant in a fresh process; its report lines echoed, its summary returned."""
    env = {**os.environ, **VARIANTS[name]}
    if args.count_primitives:
        env["ONEDNN_VERBOSE"] = "profile_create"
    argv = [sys.executable, __file__, "--child", "--model", args.model, "--requests", str(args.requests)]
    argv += ["--every", str(args.every), "--max-len", str(args.max_len), "--output-len", str(args.output_len)]
    rss: list[float] = []
    speed: list[float] = []
    cpu: list[float] = []
    built = found = 0
    build_ms = 0.0
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if created := _CREATE.search(line):
                built += created[1] == "miss"
                found += created[1] == "hit"
                build_ms += float(created[2]) * (created[1] == "miss")
                continue
            if line.startswith("onednn_verbose"):
                continue
            if report := _REPORT.match(line):
                rss.append(float(report[2]))
                speed.append(float(report[3]))
                cpu.append(float(report[4]))
                if args.count_primitives:
                    line = f"{line.rstrip()}, oneDNN primitives built {built} (found {found}), {build_ms:.0f} ms\n"
            print(line, end="", flush=True)
    if child.returncode:
        raise SystemExit(f"{name}: the child failed ({child.returncode})")
    later, later_cpu = speed[1:] or speed, cpu[1:] or cpu
    summary = {
        "rise_mb": rss[-1] - rss[0],
        "tok_s": sum(later) / len(later),
        "cpu_ms": sum(later_cpu) / len(later_cpu),
        "built": built,
        "build_ms": build_ms,
    }
    print(
        f"  rise after the first {args.every}: {summary['rise_mb']:+.0f} MB; after the first batch "
        f"{summary['tok_s']:.1f} tok/s, {summary['cpu_ms']:.2f} CPU ms/token",
        flush=True,
    )
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:smollm2-135m")
    p.add_argument("--variant", choices=sorted(VARIANTS), action="append")
    p.add_argument("--requests", type=int, default=480)
    p.add_argument("--every", type=int, default=48)
    p.add_argument("--max-len", type=int, default=300)
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--count-primitives", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run(args.model, args.requests, args.every, args.max_len, args.output_len)
        return
    names = args.variant or list(VARIANTS)
    results: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.repeat):
        for name in names:
            print(f"== {name} (round {round_ + 1})", flush=True)
            results.setdefault(name, []).append(run_variant(name, args))
    print("\n| variant (each run) | rise MB | tok/s | CPU ms/token | primitives built | building them, s |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        rises = ", ".join(f"{r['rise_mb']:+.0f}" for r in runs)
        speeds = ", ".join(f"{r['tok_s']:.0f}" for r in runs)
        cpus = ", ".join(f"{r['cpu_ms']:.2f}" for r in runs)
        built = ", ".join(f"{r['built']:.0f}" for r in runs) if args.count_primitives else "-"
        secs = ", ".join(f"{r['build_ms'] / 1e3:.1f}" for r in runs) if args.count_primitives else "-"
        print(f"| {name} | {rises} | {speeds} | {cpus} | {built} | {secs} |")


if __name__ == "__main__":
    main()
