"""Mixture of experts (Mixtral, Qwen3-MoE) against transformers on tiny random models: logits,
greedy tokens through the engine, per-expert checkpoints as well as fused ones. (A token's result
independent of its batch: tests/server/test_family_invariance.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnserve.model.loader import LoadedModel, load_model
from attnserve.server.engine.request import SamplingParams
from tests.helpers import forward_all, save_tiny_hf_model, write_byte_tokenizer
from tests.server.engine_utils import make_engine

FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 48},
    "qwen3_moe": {
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 40,
        "norm_topk_prob": False,
        "head_dim": 16,
    },
}


def hf_folder(folder: Path, architecture: str) -> Any:
    torch.manual_seed(0)
    hf = save_tiny_hf_model(folder, architecture, initializer_range=0.1, **FAMILIES[architecture])
    write_byte_tokenizer(folder)
    return hf


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LoadedModel]:
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp(request.param)
    hf = hf_folder(folder, request.param)
    return hf, load_model(folder, dtype=torch.float32)


def prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in lengths]


def test_logits_match_transformers(moe: tuple[Any, LoadedModel]) -> None:
    hf, ours = moe
    assert ours.config.num_experts == 6
    batch = prompts((3, 17, 40))
    with torch.inference_mode():
        reference = [hf(torch.tensor([p])).logits[0].float() for p in batch]
    diff = max((a - b).abs().max().item() for a, b in zip(forward_all(ours.model, batch), reference, strict=True))
    assert diff <= 1e-4, diff


def test_greedy_tokens_through_the_engine_match_transformers(moe: tuple[Any, LoadedModel]) -> None:
    hf, ours = moe
    engine = make_engine(ours, max_num_batched_tokens=12, block_size=4)
    try:
        for prompt in prompts((30,), seed=1):
            out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True)))
            ids = list(prompt)
            with torch.inference_mode():
                for _ in range(10):
                    ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            assert out.token_ids == ids[len(prompt) :]
    finally:
        engine.shutdown(5)


def test_per_expert_checkpoints_load_as_the_fused_ones(moe: tuple[Any, LoadedModel], tmp_path: Path) -> None:
    """The published files name each expert's matrices (Mixtral: w1/w2/w3 under block_sparse_moe)."""
    arch = moe[1].config.architecture
    source = tmp_path / "fused"
    hf_folder(source, arch)
    tensors = {}
    for path in source.glob("*.safetensors"):
        tensors |= load_file(path)
    split: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("mlp.experts.gate_up_proj")
            for e, matrix in enumerate(tensor):
                gate, up = matrix.chunk(2)
                if arch == "mixtral":
                    split[f"{prefix}block_sparse_moe.experts.{e}.w1.weight"] = gate.contiguous()
                    split[f"{prefix}block_sparse_moe.experts.{e}.w3.weight"] = up.contiguous()
                else:
                    split[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate.contiguous()
                    split[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up.contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("mlp.experts.down_proj")
            for e, matrix in enumerate(tensor):
                key = (
                    f"block_sparse_moe.experts.{e}.w2.weight"
                    if arch == "mixtral"
                    else f"mlp.experts.{e}.down_proj.weight"
                )
                split[prefix + key] = matrix.contiguous()
        elif name.endswith("mlp.gate.weight") and arch == "mixtral":
            split[name.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = tensor
        else:
            split[name] = tensor
    if not any("experts.0." in name for name in split):
        pytest.skip("transformers saved per-expert names already; the fused form is what needs converting")
    target = tmp_path / "split"
    target.mkdir()
    save_file(split, str(target / "model.safetensors"))
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (target / extra).write_bytes((source / extra).read_bytes())
    reloaded = load_model(target, dtype=torch.float32)
    batch = prompts((9,))
    assert torch.equal(
        forward_all(reloaded.model, batch)[0], forward_all(load_model(source, dtype=torch.float32).model, batch)[0]
    )
