"""Time to first token of one long prompt (2,048 tokens, 512-token chunks), batch-invariant path
against the fast one, side by side: what the row-exact attention costs where prompts are long.

    python bench/long_prefill.py [float32|bfloat16]
"""

import asyncio
import sys
import time

import torch

from attnserve.model.loader import load_model
from attnserve.server.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from attnserve.server.engine.core import build_engine
from attnserve.server.engine.request import SamplingParams


def main() -> None:
    dtype = torch.bfloat16 if sys.argv[1:] == ["bfloat16"] else torch.float32
    res: dict[bool, list[float]] = {}
    for rnd in range(2):
        for inv in (True, False):
            cfg = EngineConfig(
                scheduler=SchedulerConfig(max_num_batched_tokens=512),
                cache=CacheConfig(kv_cache_memory=1 << 30, enable_prefix_caching=False),
                batch_invariant=inv,
            )
            eng = build_engine(lambda: load_model("dummy:smollm2-135m", dtype=dtype), cfg).start()
            prompt = torch.randint(100, 40000, (2048,), generator=torch.Generator().manual_seed(rnd)).tolist()
            asyncio.run(eng.generate(prompt[:8], SamplingParams(max_tokens=1)))
            t = time.perf_counter()
            asyncio.run(eng.generate(prompt, SamplingParams(max_tokens=1)))
            res.setdefault(inv, []).append(time.perf_counter() - t)
            eng.shutdown(5)
    print({("invariant" if k else "fast"): [round(x, 2) for x in v] for k, v in res.items()})


if __name__ == "__main__":
    main()
