"""Offline engine throughput against transformers `generate`, on the default model.

    make bench-engine            # or: python bench/engine_bench.py --dtypes bfloat16 float32

For each dtype, in one run on this machine:
  - the engine with C requests submitted together (C = 1, 4, 16, 64);
  - transformers `generate`, one request at a time, and in padded static batches of 16.
Every request has the same prompt length and generates exactly --output-len tokens
(EOS ignored). Output tokens/s = generated tokens / wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import torch

from attnserve.model.fetch import default_model_path
from attnserve.model.loader import cpu_flags, load_model, parse_dtype
from attnserve.server.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from attnserve.server.engine.core import Engine, build_engine
from attnserve.server.engine.request import SamplingParams


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=gen).tolist() for _ in range(n)]


class StepClock:
    """Wall time inside the engine's step, the runner's execute and the model's forward (engine thread)."""

    def __init__(self, engine: Engine) -> None:
        self.seconds = {"step": 0.0, "execute": 0.0, "forward": 0.0}
        self.steps = 0
        self._wrap(engine, "step", "step")
        self._wrap(engine.runner, "execute", "execute")
        self._wrap(engine.runner.model, "forward", "forward")

    def _wrap(self, owner: object, name: str, bucket: str) -> None:
        original = getattr(owner, name)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[bucket] += time.perf_counter() - start
                self.steps += bucket == "step"

        setattr(owner, name, timed)

    def report(self, label: str) -> str:
        n, s = max(self.steps, 1), self.seconds
        around = s["step"] - s["forward"]
        return (
            f"{label}: {n} steps, {s['step'] / n * 1e3:.2f} ms a step: model forward {s['forward'] / n * 1e3:.2f}, "
            f"the engine around it {around / n * 1e3:.2f} ({around / max(s['step'], 1e-9):.1%}: runner inputs and "
            f"sampling {(s['execute'] - s['forward']) / n * 1e3:.2f}, scheduling, outputs, detokenizing and delivery "
            f"{(s['step'] - s['execute']) / n * 1e3:.2f})"
        )


def bench_engine(
    model: str,
    dtype: torch.dtype,
    prompt_len: int,
    concurrency: int,
    output_len: int,
    *,
    batch_invariant: bool = True,
    breakdown: bool = False,
) -> float:
    config = EngineConfig(
        scheduler=SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=max(64, concurrency)),
        cache=CacheConfig(kv_cache_memory=1 << 30, enable_prefix_caching=False),
        batch_invariant=batch_invariant,
    )
    # Loaded in the engine's own way (see build_engine): a model loaded on this thread would slow its steps.
    engine = build_engine(lambda: load_model(model, dtype=dtype), config).start()
    prompts = make_prompts(max(concurrency, 4), prompt_len, engine.loaded.config.vocab_size, seed=concurrency)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)

    async def closed_loop() -> int:
        queue = list(prompts)
        produced = 0

        async def worker() -> None:
            nonlocal produced
            while queue:
                out = await engine.generate(queue.pop(), params)
                produced += len(out.token_ids)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return produced

    asyncio.run(engine.generate(prompts[0][:8], SamplingParams(max_tokens=2)))  # warm-up
    clock = StepClock(engine) if breakdown else None
    start = time.perf_counter()
    produced = asyncio.run(closed_loop())
    elapsed = time.perf_counter() - start
    engine.shutdown(5)
    if clock is not None:
        print("  " + clock.report(f"C={concurrency}"))
    return produced / elapsed


def bench_transformers(hf_model, prompts: list[list[int]], batch_size: int, output_len: int, pad_id: int) -> float:
    produced, elapsed = 0, 0.0
    hf_model.generation_config.pad_token_id = pad_id
    with torch.inference_mode():
        hf_model.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=2, do_sample=False)  # warm-up
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            start = time.perf_counter()
            out = hf_model.generate(
                ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False
            )
            elapsed += time.perf_counter() - start
            produced += (out.shape[1] - width) * len(batch)
    return produced / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--batch-invariant",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="engine rows with the invariant path (on, the default) and/or the fast one (off), side by side",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also print each step's time in the model and around it (engine)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/engine.json"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    results: dict[str, dict[str, float]] = {}
    for dtype_name in args.dtypes:
        dtype = parse_dtype(dtype_name)
        row: dict[str, float] = {}
        for c in args.concurrency:
            for mode in args.batch_invariant:
                name = f"engine C={c}" + ("" if args.batch_invariant == ["on"] else f" invariant={mode}")
                row[name] = bench_engine(
                    args.model,
                    dtype,
                    args.prompt_len,
                    c,
                    args.output_len,
                    batch_invariant=mode == "on",
                    breakdown=args.breakdown,
                )
                print(f"{dtype_name} {name}: {row[name]:.1f} tok/s", flush=True)
        if not args.skip_transformers:
            import transformers

            path = Path(args.model)
            # Dense weights, as in our engine: transformers 5 otherwise keeps GGUF blocks packed and
            # runs slower de-quantising matmuls, which would flatter us.
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent,
                gguf_file=path.name,
                dtype=dtype,
                quantization_config=transformers.GgufConfig(dequantize=True),
            ).eval()
            for bs, n in ((1, 4), (16, 32)):
                prompts = make_prompts(n, args.prompt_len, hf.config.vocab_size, seed=100 + bs)
                row[f"transformers bs={bs}"] = bench_transformers(hf, prompts, bs, args.output_len, pad_id=2)
                print(f"{dtype_name} transformers bs={bs}: {row[f'transformers bs={bs}']:.1f} tok/s", flush=True)
            del hf
        results[dtype_name] = row

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; CPU flags: {cpu_flags()}; "
        f"prompt {args.prompt_len} tokens, output {args.output_len} tokens"
    )
    names = list(next(iter(results.values())))
    print("| dtype | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for dtype_name, row in results.items():
        print(f"| {dtype_name} | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
    for dtype_name, row in results.items():
        for c in args.concurrency:
            on, off = row.get(f"engine C={c} invariant=on"), row.get(f"engine C={c} invariant=off")
            if on and off:
                print(f"{dtype_name} C={c}: invariant / fast = {on / off:.3f} (cost {100 * (1 - on / off):.1f} %)")
    for dtype_name, row in results.items():
        if "transformers bs=1" in row and "engine C=16" in row:
            print(
                f"{dtype_name}: C=16 / C=1 = {row['engine C=16'] / row['engine C=1']:.2f}x; "
                f"C=16 / transformers bs=16 = {row['engine C=16'] / row['transformers bs=16']:.2f}x; "
                f"C=1 / transformers bs=1 = {row['engine C=1'] / row['transformers bs=1']:.2f}x"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.json.write_text(
        json.dumps({"args": vars(args) | {"json": str(args.json)}, "machine": meta, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
