"""A decode step brings its results to the host once: no per-row (or per-layer) device reads.

On CPU a device read costs nothing, so the test counts the calls that would block on a GPU
(``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, and ``bool``/``int``/``float``/index
conversions of a tensor) during one ``ModelRunner.execute``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from attnserve.model.loader import LoadedModel
from attnserve.server.engine.config import CacheConfig
from attnserve.server.engine.records import ScheduledRequest, SchedulerOutput
from attnserve.server.engine.request import SamplingParams
from attnserve.server.engine.runner import ModelRunner

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
BLOCK_SIZE = 16


@contextmanager
def count_host_syncs() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    with pytest.MonkeyPatch.context() as mp:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            mp.setattr(torch.Tensor, name, counted)
        yield counts


PARAMS = [
    SamplingParams(),  # greedy
    SamplingParams(logprobs=3),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, logprobs=2),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, min_p=0.1, seed=11, repetition_penalty=1.3),
    SamplingParams(temperature=0.9),
]


def _step(
    prompts: list[list[int]], outputs: list[list[int]], params: list[SamplingParams], *, decode: bool
) -> SchedulerOutput:
    requests = []
    for i, (prompt, out, p) in enumerate(zip(prompts, outputs, params, strict=True)):
        tokens = [*prompt, *out]
        new = tokens[-1:] if decode else tokens
        computed = len(tokens) - len(new)
        first_block = 1 + i * 8  # 8 blocks (128 slots) per request, apart from each other
        needed = -(-len(tokens) // BLOCK_SIZE)
        requests.append(
            ScheduledRequest(
                request_id=f"r{i}",
                token_ids=new,
                num_computed_tokens=computed,
                block_table=list(range(first_block, first_block + needed)),
                params=p,
                num_output_tokens=len(out),
                num_prompt_tokens=len(prompt),
                is_sampling=True,
                all_token_ids=tokens if p.repetition_penalty != 1.0 else None,
            )
        )
    return SchedulerOutput(requests=requests, num_batched_tokens=sum(len(r.token_ids) for r in requests))


@pytest.mark.parametrize("params", [PARAMS, [SamplingParams()] * 4], ids=["mixed-sampling", "all-greedy"])
def test_decode_step_syncs_once(tiny: LoadedModel, params: list[SamplingParams]) -> None:
    runner = ModelRunner(tiny.model, CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory=8 << 20))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, tiny.config.vocab_size, (n,), generator=gen).tolist() for n in (7, 20, 33, 3, 12, 16)]
    prompts = prompts[: len(params)]
    outputs: list[list[int]] = [[] for _ in prompts]
    counted: dict[str, int] | None = None
    for step in range(3):  # the prefill, then two decode steps (the last one counted)
        plan = _step(prompts, outputs, params, decode=step > 0)
        with count_host_syncs() as counts:
            result = runner.execute(plan)
        if step == 2:
            counted = dict(counts)
        for i, out in enumerate(outputs):
            out.append(result.sampled_token_ids[f"r{i}"])
    # Exactly one: the tokens (and their logprobs) come back together. (Before: 14 for the mixed batch.)
    assert counted is not None and sum(counted.values()) == 1, f"host syncs in one decode step: {counted}"
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert f"r{i}" not in result.logprobs
        else:
            lp = result.logprobs[f"r{i}"]
            assert len(lp.top_token_ids) == len(lp.top_logprobs) == p.logprobs
            assert lp.logprob <= 0.0 and lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
