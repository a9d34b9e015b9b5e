"""Batching is invisible: a request's tokens never depend on its neighbours, its chunking or the prefix cache.

Every dtype is tested on every machine (never picked from the CPU's flags): bfloat16 runs
natively where the CPU has AVX512-BF16 and emulated elsewhere, and must be invariant either way.
The tiny random model is the harshest case: its logits are nearly flat, so a one-ulp change
anywhere in a step flips a greedy token within a few steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnserve.model.loader import LoadedModel, load_model
from attnserve.server.engine.request import SamplingParams
from tests.server.engine_utils import make_engine, run_alone, run_together

DTYPES = [torch.float32, torch.bfloat16]


def varied_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 3 to 120 tokens; a third share a 40-token prefix (a system prompt), so the
    prefix cache serves some of them, and the lengths make chunk boundaries fall everywhere."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, vocab, (40,), generator=gen).tolist()
    out = []
    for i in range(n):
        size = int(torch.randint(3, 120, (1,), generator=gen))
        tail = torch.randint(3, vocab, (size,), generator=gen).tolist()
        out.append(shared + tail[: max(1, size - 40)] if i % 3 == 0 else tail)
    return out


@pytest.fixture(
    scope="module",
    params=[(shape, dtype) for shape in ("tiny", "tiny-wide") for dtype in DTYPES],
    ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}",
)
def model(request: pytest.FixtureRequest) -> LoadedModel:
    """The tiny test model, and one with the default model's widths (its kernels' shapes)."""
    shape, dtype = request.param
    return load_model(f"dummy:{shape}", dtype=dtype, seed=0)


def test_32_prompts_48_tokens_identical_alone_and_among_31_others(model: LoadedModel) -> None:
    ps = varied_prompts(32, model.config.vocab_size)
    # Greedy for most, seeded sampling for some: the sampler must be invariant too.
    params = [
        SamplingParams(max_tokens=48, ignore_eos=True)
        if i % 4
        else SamplingParams(max_tokens=48, ignore_eos=True, temperature=0.8, top_p=0.9, seed=i)
        for i in range(len(ps))
    ]
    # A small token budget: alone, a long prompt is cut into 40-token chunks; together, its
    # chunks start wherever the other prompts left room.
    together_engine = make_engine(model, max_num_batched_tokens=40, block_size=8)
    alone_engine = make_engine(model, max_num_batched_tokens=40, block_size=8)
    try:
        together = run_together(together_engine, ps, params)
        alone = run_alone(alone_engine, ps, params)
        assert alone_engine.block_manager.num_prefix_hits > 0, "the shared prefix should have hit the cache"
    finally:
        together_engine.shutdown(5)
        alone_engine.shutdown(5)
    assert all(len(o.token_ids) == 48 for o in together + alone)
    mismatched = [
        (i, next(k for k, (a, b) in enumerate(zip(t.token_ids, s.token_ids, strict=True)) if a != b))
        for i, (t, s) in enumerate(zip(together, alone, strict=True))
        if t.token_ids != s.token_ids
    ]
    assert not mismatched, f"(request, first differing token) batched vs alone: {mismatched}"


@pytest.mark.parametrize("budget", [512, 24])
def test_same_prompt_cold_then_warm_prefix_cache(model: LoadedModel, budget: int) -> None:
    """The second run reads the first's blocks from the cache and computes only the rest."""
    prompt = varied_prompts(1, model.config.vocab_size, seed=5)[0] + list(range(3, 90))
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    engine = make_engine(model, max_num_batched_tokens=budget, block_size=8)
    try:
        cold = run_alone(engine, [prompt], params)[0]
        hits = engine.block_manager.num_prefix_hits
        warm = run_alone(engine, [prompt], params)[0]
        assert engine.block_manager.num_prefix_hits - hits >= len(prompt) - 8, "the warm run should hit the cache"
    finally:
        engine.shutdown(5)
    assert warm.token_ids == cold.token_ids


@pytest.mark.slow
def test_invariant_on_avx2_kernels_too() -> None:
    """The same tests with torch and oneDNN held to AVX2, as on a CPU without AVX512 or native bf16
    (bf16 linears then run in float32 from an upcast copy): both kernel families, on every machine."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    test = f"{Path(__file__)}::test_32_prompts_48_tokens_identical_alone_and_among_31_others"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", test],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout
