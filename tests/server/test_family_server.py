"""Every family through the real server process: one greedy request alone, then the same request
among 15 others of other lengths, gives the same tokens, in float32 and bfloat16 (the dtype is
set on the command line, never left to the machine); in float32 they are transformers' greedy
`generate` tokens too.

One `python -m server` per (family, dtype), on an HF folder built with transformers. The prompt
runs past the windowed families' window (8) and the token budget cuts it into chunks, so windows,
soft-caps, q/k norms, partial rotary and experts all go through the batched, chunked step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from attnserve.client import AsyncClient, Client
from tests.helpers import save_tiny_hf_model, transformers_greedy, write_byte_tokenizer
from tests.server.server_process import ServerProcess
from tests.server.test_family_invariance import FAMILIES as _OTHER_FAMILIES

pytestmark = pytest.mark.slow  # 18 server processes, about 5 s each

FAMILIES: dict[str, dict[str, Any]] = {"llama": {}, "qwen2": {}, **_OTHER_FAMILIES}
MAX_TOKENS = 16


def _prompts(seed: int = 7) -> list[list[int]]:
    """The request under test (20 tokens: past the window) first, then 15 others of 3 to 40 tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [20, *torch.randint(3, 41, (15,), generator=gen).tolist()]
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(
    scope="module",
    params=[pytest.param(f, marks=pytest.mark.xdist_group(f"family-server-{f}")) for f in sorted(FAMILIES)],
)
def family_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(folder, the transformers model saved there): built once for both dtypes."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = save_tiny_hf_model(folder, request.param, initializer_range=0.1, **FAMILIES[request.param])
    write_byte_tokenizer(folder)
    return folder, hf


@pytest.fixture(params=["float32", "bfloat16"])
def server(request: pytest.FixtureRequest, family_folder: tuple[Path, Any]) -> Iterator[ServerProcess]:
    folder, _ = family_folder
    args = ["--model", str(folder), "--dtype", request.param, "--kv-cache-memory", "16MiB", "--block-size", "4"]
    # A small step budget: the 20-token prompt is chunked alone, and chunked differently among others.
    args += ["--max-num-batched-tokens", "24", "--http-port", "0", "--shutdown-timeout", "5"]
    proc = ServerProcess(args).start(folder / f"server-{request.param}.log")
    try:
        yield proc.wait_serving()
    finally:
        proc.stop()


async def _together(target: str, prompts: list[list[int]]) -> list[list[int]]:
    async with AsyncClient(target, timeout=120) as client:
        replies = await asyncio.gather(
            *(client.generate(token_ids=p, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True) for p in prompts)
        )
    return [list(r.completions[0].token_ids) for r in replies]


def test_greedy_tokens_alone_among_15_others_and_against_transformers(
    server: ServerProcess, family_folder: tuple[Path, Any]
) -> None:
    prompts = _prompts()
    with Client(server.target, timeout=120) as client:
        reply = client.generate(token_ids=prompts[0], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        dtype = client.model_info().dtype
    alone = list(reply.completions[0].token_ids)
    together = asyncio.run(_together(server.target, prompts))
    assert len(alone) == MAX_TOKENS and all(len(t) == MAX_TOKENS for t in together)
    assert together[0] == alone, f"{dtype}: among 15 others {together[0]} != alone {alone}"
    if "float32" in dtype:
        assert alone == transformers_greedy(family_folder[1], prompts[0], MAX_TOKENS)[0]
