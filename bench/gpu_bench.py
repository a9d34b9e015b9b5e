"""The kept GPU benchmark: decode steps of an 8B shape against the memory-bandwidth roofline.

    python bench/gpu_bench.py                                   # dummy:llama-3-8b, bf16, cuda
    python bench/gpu_bench.py --batch 1 64 --context 2048       # the two points the README quotes
    python bench/gpu_bench.py --model dummy:tiny --device cpu --context 64 --steps 3   # smoke run

A decode step must read every weight once and each sequence's K/V once, so its floor is
(weight bytes + batch x context x K/V bytes per token) / bandwidth, with the bandwidth measured
here by a device-to-device copy (each byte counted once read and once written, as a step's
bytes are only read: the copy's rate is a conservative ceiling). The step is the engine's own
decode (``GraphDecode``: captured as a CUDA graph on a GPU) through the model, logits and argmax
to the host included; its median over ``--steps`` after a warm-up is quoted with tokens/s and
the step / floor ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attnserve.model.attention import AttentionMetadata  # noqa: E402
from attnserve.model.kv_cache import KVCache, kv_cache_bytes_per_block  # noqa: E402
from attnserve.model.loader import load_model, parse_dtype  # noqa: E402
from attnserve.server.engine.graph_decode import GraphDecode  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, num_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second moved by one large device copy (read + write), best of a few."""
    src = torch.ones(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def decode_point(model: torch.nn.Module, batch: int, context: int, block_size: int, steps: int) -> float:
    """Median seconds of one decode step of ``batch`` sequences at ``context`` tokens."""
    device = model.device
    blocks_each = -(-(context + 1) // block_size)
    cache = KVCache.for_model(model, num_blocks=2 + batch * blocks_each, block_size=block_size)
    for layer in cache.layers:  # values as a real cache holds them (their bits do not change the time)
        layer.normal_()
    tables = [[1 + b * blocks_each + j for j in range(blocks_each)] for b in range(batch)]
    graph = GraphDecode(
        model,
        cache,
        max_num_seqs=batch,
        max_blocks_per_seq=blocks_each,
        scratch_slot=(cache.num_blocks - 1) * block_size,
        capture=device.type == "cuda",
    )
    ids = torch.randint(100, model.config.vocab_size - 100, (batch,), device=device)
    times = []
    with torch.inference_mode():
        for step in range(steps + 2):  # two warm-up steps
            meta = AttentionMetadata.build(
                block_tables=tables,
                seq_lens=[context] * batch,
                query_lens=[1] * batch,
                block_size=block_size,
                device=device,
                logits_indices=list(range(batch)),
            )
            sync(device)
            start = time.perf_counter()
            logits = graph.run(meta, ids) if graph.can_run(meta) else model(ids, meta.positions, cache, meta)
            logits.argmax(dim=-1).tolist()
            elapsed = time.perf_counter() - start
            if step >= 2:
                times.append(elapsed)
    del cache, graph
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:llama-3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, nargs="+", default=[2048])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, help="write the rows here too")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    loaded = load_model(a.model, device=device, dtype=parse_dtype(a.dtype))
    model = loaded.model
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_per_token = kv_cache_bytes_per_block(
        model.local_config, 1, KVCache.for_model(model, num_blocks=1, block_size=1).layers[0].dtype
    )
    bandwidth = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 256 << 20)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"{a.model} {a.dtype} on {name}: weights {weight_bytes / 1e9:.2f} GB, K/V {kv_per_token / 1e3:.1f} kB/token, "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    print(f"{'batch':>5} {'context':>7} {'step ms':>8} {'tok/s':>8} {'floor ms':>8} {'step/floor':>10}")
    rows = []
    for context in a.context:
        for batch in a.batch:
            seconds = decode_point(model, batch, context, a.block_size, a.steps)
            floor = (weight_bytes + batch * context * kv_per_token) / bandwidth
            row = dict(batch=batch, context=context, step_ms=seconds * 1e3, tok_s=batch / seconds, floor_ms=floor * 1e3)
            rows.append(row)
            print(
                f"{batch:5d} {context:7d} {seconds * 1e3:8.2f} {batch / seconds:8.0f} {floor * 1e3:8.2f} "
                f"{seconds / floor:10.2f}"
            )
    if a.json is not None:
        a.json.write_text(json.dumps({"model": a.model, "dtype": a.dtype, "device": name, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
