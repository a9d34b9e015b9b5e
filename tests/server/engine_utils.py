"""Helpers to drive an Engine from synchronous tests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from attnserve.model.loader import LoadedModel
from attnserve.server.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from attnserve.server.engine.core import Engine
from attnserve.server.engine.outputs import RequestOutput
from attnserve.server.engine.request import SamplingParams


def make_engine(
    loaded: LoadedModel,
    *,
    kv_cache_memory: int = 64 << 20,
    block_size: int = 16,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 512,
    max_num_waiting: int = 256,
    enable_prefix_caching: bool = True,
    release_out_of_window_blocks: bool = True,
    batch_invariant: bool = True,
    start: bool = True,
) -> Engine:
    config = EngineConfig(
        scheduler=SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs, max_num_waiting=max_num_waiting
        ),
        cache=CacheConfig(
            block_size=block_size,
            kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching,
            release_out_of_window_blocks=release_out_of_window_blocks,
        ),
        batch_invariant=batch_invariant,
    )
    engine = Engine(loaded, config)
    return engine.start() if start else engine


def run_together(
    engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
) -> list[RequestOutput]:
    """Submit every request at once (one event loop) and wait for all."""
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)

    async def main() -> list[RequestOutput]:
        return list(await asyncio.gather(*[engine.generate(p, sp) for p, sp in zip(prompts, plist, strict=True)]))

    return asyncio.run(main())


def run_alone(
    engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
) -> list[RequestOutput]:
    """Serve each request by itself, one after another."""
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    return [run_together(engine, [p], [sp])[0] for p, sp in zip(prompts, plist, strict=True)]
