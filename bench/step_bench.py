"""Decode-step time against context length, beside what reading the K/V costs at this machine's bandwidth;
then the host time of a decode step's metadata at batch 1..256.

    python bench/step_bench.py                      # dummy:smollm2-135m shape, float32
    python bench/step_bench.py --batch 1 16 --context 128 2048 --kv-budget-gb 2

For each batch size B and context C (skipping those whose K/V exceed --kv-budget-gb), one
decode step through the model (forward + argmax to the host) is timed with K/V read in place
("new") and with the old path that copies every sequence's context out of the cache per
layer ("old", swapped in from this file: the server no longer has it). The two run
alternately in one process, so the ratio holds on a noisy machine even when the absolute
times drift.

"context cost" is the step time at C minus the time at C=128 for the same B. The target: at
most what reading the extra K/V once takes at half the machine's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from attnserve.model import attention
from attnserve.model.attention import AttentionMetadata
from attnserve.model.kv_cache import KVCache, kv_cache_bytes_per_block
from attnserve.model.loader import LoadedModel, load_model, parse_dtype

BASE_CONTEXT = 128


def gather_decode_attention(
    q: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The decode path before paged attention read in place: copy each sequence's blocks, then one masked SDPA."""
    assert meta.decode_block_tables is not None
    tables = meta.decode_block_tables.long()
    batch, width = tables.shape[0], tables.shape[1] * layer_cache.shape[2]
    kv = layer_cache[:, tables].view(2, batch, width, *layer_cache.shape[-2:]).transpose(2, 3)  # (2, B, Hkv, W, D)
    lens = torch.tensor(meta.decode_seq_lens_host)
    mask = None
    if bool((lens < width).any()):
        mask = (torch.arange(width)[None, :] < lens[:, None])[:, None, None, :].to(q.device)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0], kv[1], attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = sorted(f for f in flags if f in ("avx2", "fma", "f16c") or f.startswith(("avx512", "amx")))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{model}; {' '.join(wanted) or 'no avx2/avx512/amx'}"


def copy_bandwidth(num_bytes: int = 512 << 20, repeats: int = 7) -> float:
    """Bytes per second of one large tensor copy (each byte counted once), best of a few."""
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best


def interleaved_tables(batch: int, num_blocks_each: int) -> list[list[int]]:
    """Block tables whose sequences' blocks interleave, as after many steps of a busy server (block 0 unused)."""
    return [[1 + b + batch * j for j in range(num_blocks_each)] for b in range(batch)]


def step_timer(loaded: LoadedModel, batch: int, context: int, block_size: int) -> Callable[[], float]:
    """A function timing one decode step of `batch` sequences at `context` tokens (metadata built untimed)."""
    model = loaded.model
    num_blocks_each = -(-context // block_size)
    cache = KVCache.for_model(model, num_blocks=1 + batch * num_blocks_each, block_size=block_size)
    for layer in cache.layers:  # K/V values as a real cache would hold them
        layer.normal_()
    tables = interleaved_tables(batch, num_blocks_each)
    ids = torch.randint(100, loaded.config.vocab_size - 100, (batch,))

    @torch.inference_mode()
    def run() -> float:
        meta = AttentionMetadata.build(
            block_tables=tables, seq_lens=[context] * batch, query_lens=[1] * batch, block_size=block_size
        )
        start = time.perf_counter()
        model(ids, meta.positions, cache, meta).argmax(dim=-1).tolist()
        return time.perf_counter() - start

    return run


def measure(timer: Callable[[], float], paths: list[str], repeats: int) -> dict[str, float]:
    """Median step time per path, the paths alternating so that drift hits both alike."""
    times: dict[str, list[float]] = {p: [] for p in paths}
    original = attention.decode_attention
    try:
        for _ in range(repeats + 1):  # the first round warms up
            for path in paths:
                attention.decode_attention = gather_decode_attention if path == "old" else original
                times[path].append(timer())
    finally:
        attention.decode_attention = original
    return {p: statistics.median(t[1:]) for p, t in times.items()}


def metadata_times(block_size: int, context: int = 2048, batches: tuple[int, ...] = (1, 16, 64, 256)) -> None:
    """Host time to build a decode step's metadata, from lists (as before) and from the runner's kept rows."""
    print(f"\nStep metadata, decode at context {context}, host time (median of 50):")
    print(f"{'B':>4} {'from lists':>11} {'kept rows':>10}")
    for batch in batches:
        tables = interleaved_tables(batch, -(-(context + 1) // block_size))
        rows = torch.tensor(tables, dtype=torch.int32)
        times = {}
        for name, kept in (("lists", None), ("rows", rows)):
            samples = []
            for _ in range(50):
                start = time.perf_counter()
                AttentionMetadata.build(
                    block_tables=tables,
                    seq_lens=[context + 1] * batch,
                    query_lens=[1] * batch,
                    block_size=block_size,
                    logits_indices=list(range(batch)),
                    token_ids=[0] * batch,
                    table_rows=kept,
                )
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples) * 1e3
        print(f"{batch:>4} {times['lists']:>9.2f}ms {times['rows']:>8.2f}ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[BASE_CONTEXT, 1024, 4096])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-budget-gb", type=float, default=4.0, help="skip points whose K/V exceed this")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path and point")
    parser.add_argument("--paths", nargs="+", choices=["new", "old"], default=["new", "old"])
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=parse_dtype(args.dtype))
    per_token = kv_cache_bytes_per_block(loaded.config, 1, loaded.model.dtype)
    bandwidth = copy_bandwidth()
    print(f"model {args.model} ({args.dtype}), K/V {per_token / 1024:.1f} KiB per token, block size {args.block_size}")
    print(f"cpu: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (one {512} MiB tensor copy, best of 7)\n")

    contexts = sorted(set(args.context) | {BASE_CONTEXT})
    header = f"{'B':>3} {'C':>5} {'K/V MB':>7} {'K/V read':>8} {'ctx target':>10}"
    header += "".join(f" {p + ' step':>9} {p + ' ctx cost':>13}" for p in args.paths)
    header += f" {'old/new':>7} {'new meets target':>16}" if len(args.paths) == 2 else ""
    print(header + "\n" + "-" * len(header))
    for batch in args.batch:
        base: dict[str, float] = {}
        for context in contexts:
            kv_bytes = batch * context * per_token
            if kv_bytes > args.kv_budget_gb * 1e9:
                print(f"{batch:>3} {context:>5} {kv_bytes / 1e6:>7.0f}  skipped (over --kv-budget-gb)")
                continue
            result = measure(step_timer(loaded, batch, context, args.block_size), args.paths, args.repeats)
            if context == BASE_CONTEXT:
                base = result
            read_ms = kv_bytes / (bandwidth / 2) * 1e3
            target_ms = batch * (context - BASE_CONTEXT) * per_token / (bandwidth / 2) * 1e3
            line = f"{batch:>3} {context:>5} {kv_bytes / 1e6:>7.0f} {read_ms:>8.1f} {target_ms:>10.1f}"
            costs = {}
            for path in args.paths:
                costs[path] = (result[path] - base[path]) * 1e3 if path in base else float("nan")
                line += f" {result[path] * 1e3:>9.1f} {costs[path]:>13.1f}"
            if len(args.paths) == 2:
                meets = "-" if context == BASE_CONTEXT else ("yes" if costs["new"] <= target_ms else "no")
                line += f" {result['old'] / result['new']:>7.2f} {meets:>16}"
            print(line, flush=True)
    print(
        "\nTimes in ms. K/V read: the batch's whole K/V read once at half the copy bandwidth. ctx cost: step time"
        f" at C minus at C={BASE_CONTEXT}; ctx target: the K/V that context adds, read once at half the bandwidth."
    )
    metadata_times(args.block_size)


if __name__ == "__main__":
    main()
