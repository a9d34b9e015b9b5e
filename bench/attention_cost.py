"""What asking for attention weights costs the requests that did not ask.

    python bench/attention_cost.py          # default model, fp32, C=16

Runs the same closed-loop load twice through the engine: once with no request
asking for attention, once with every fourth request asking for last-layer
attention (mean over heads). Reports the output tok/s of the requests that did
NOT ask, in both runs, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from attnserve.model.fetch import default_model_path
from attnserve.model.loader import load_model, parse_dtype
from attnserve.server.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from attnserve.server.engine.core import Engine
from attnserve.server.engine.request import AttentionOptions, SamplingParams


def run(loaded, prompts: list[list[int]], concurrency: int, output_len: int, asking_every: int | None) -> dict:
    engine = Engine(
        loaded,
        EngineConfig(
            scheduler=SchedulerConfig(max_num_seqs=64),
            cache=CacheConfig(kv_cache_memory=1 << 30, enable_prefix_caching=False),
        ),
    )
    engine.start()
    plain = SamplingParams(max_tokens=output_len, ignore_eos=True)
    asking = SamplingParams(
        max_tokens=output_len, ignore_eos=True, attention=AttentionOptions(layers=(loaded.config.num_layers - 1,))
    )
    stats = {"plain_tokens": 0, "asking_tokens": 0, "plain_time": 0.0}

    async def closed_loop() -> None:
        queue = list(enumerate(prompts))

        async def worker() -> None:
            while queue:
                i, prompt = queue.pop()
                asks = asking_every is not None and i % asking_every == 0
                start = time.perf_counter()
                out = await engine.generate(prompt, asking if asks else plain)
                if asks:
                    stats["asking_tokens"] += len(out.token_ids)
                else:
                    stats["plain_tokens"] += len(out.token_ids)
                    stats["plain_time"] += time.perf_counter() - start

        await asyncio.gather(*[worker() for _ in range(concurrency)])

    asyncio.run(engine.generate(prompts[0][:4], SamplingParams(max_tokens=2)))
    start = time.perf_counter()
    asyncio.run(closed_loop())
    stats["wall"] = time.perf_counter() - start
    engine.shutdown(5)
    # Per-request decode speed of the non-asking requests: their tokens over their own latency.
    stats["plain_tok_s_per_request"] = stats["plain_tokens"] / stats["plain_time"]
    stats["total_tok_s"] = (stats["plain_tokens"] + stats["asking_tokens"]) / stats["wall"]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=parse_dtype(args.dtype))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.prompt_len,), generator=gen).tolist() for _ in range(args.requests)]
    base = run(loaded, prompts, args.concurrency, args.output_len, asking_every=None)
    mixed = run(loaded, prompts, args.concurrency, args.output_len, asking_every=4)
    ratio = mixed["plain_tok_s_per_request"] / base["plain_tok_s_per_request"]
    print(f"C={args.concurrency}, {args.requests} requests, {args.prompt_len}+{args.output_len} tokens, {args.dtype}")
    print(
        f"no attention:        total {base['total_tok_s']:.1f} tok/s, per plain request "
        f"{base['plain_tok_s_per_request']:.2f} tok/s"
    )
    print(
        f"25% ask (last layer): total {mixed['total_tok_s']:.1f} tok/s, per plain request "
        f"{mixed['plain_tok_s_per_request']:.2f} tok/s"
    )
    print(f"plain requests keep {ratio:.1%} of their speed (cost {1 - ratio:.1%})")


if __name__ == "__main__":
    main()
