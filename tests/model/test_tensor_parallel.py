"""Tensor parallelism on CPU (gloo): two real ranks in two processes, each holding its shard.

For every family (tiny random HF folders, fp32): TP=2 logits within 1e-5 of TP=1, the same greedy
tokens over 32 cached decode steps, attention rows of every head equal, and each rank holding half
of the split weights. The ranks run in spawned processes; rank 0 sends its results back as numpy.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.config import named_config
from attnserve.model.generate import generate_tokens
from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.loader import load_model
from attnserve.model.parallel import TensorParallel
from tests.helpers import forward_all, new_cache, save_tiny_hf_model, write_byte_tokenizer
from tests.server.server_process import free_port
from tests.server.test_family_invariance import FAMILIES

PROMPTS = [[1, 5, 9, 33, 70, 2, 5], [1, 100, 200, 300], list(range(3, 40))]
DECODE_STEPS = 32
MODELS: dict[str, dict[str, Any]] = {
    **FAMILIES,
    "llama": {},
    "qwen2": {},
    # Fewer KV heads than ranks (each rank keeps the one its queries read), a tied head and a
    # vocabulary that does not split evenly (the last shard padded).
    "llama-kv1-tied": {"num_key_value_heads": 1, "tie_word_embeddings": True, "vocab_size": 383},
}


def _results(source: str, tp: TensorParallel | None = None) -> dict[str, Any]:
    """What one rank computes for a model: logits, greedy tokens, attention rows, weight bytes."""
    loaded = load_model(source, dtype=torch.float32, tp=tp)
    model = loaded.model
    logits = [t.numpy() for t in forward_all(model, PROMPTS)]
    tokens = list(generate_tokens(model, PROMPTS[2], max_tokens=DECODE_STEPS))
    return {
        "logits": logits,
        "tokens": tokens,
        "attention": _attention_rows(model, PROMPTS[2]),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


@torch.inference_mode()
def _attention_rows(model: LlamaForCausalLM, prompt: list[int], block_size: int = 8) -> list[np.ndarray]:
    """Every layer's rows (H, n, n) of every head for a whole prompt, read back from the paged cache."""
    n = len(prompt)
    table = list(range(1, 1 + -(-n // block_size)))
    layers = list(range(model.config.num_layers))
    meta = AttentionMetadata.build(
        block_tables=[table],
        seq_lens=[n],
        query_lens=[n],
        block_size=block_size,
        attention_requests={0: layers},
        attention_rows={0: (0, n)},
    )
    cache = new_cache(model, [table], block_size)
    model(torch.tensor(prompt), meta.positions, cache, meta)
    return [model.attention_weights(meta, cache, seq=0, layer=layer)[1].numpy() for layer in layers]


def _rank(rank: int, port: int, sources: list[str], queue: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {source: _results(source, TensorParallel.current()) for source in sources}
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def run_tp2(sources: list[str]) -> dict[int, dict[str, Any]]:
    """Each rank's results for each source, from two spawned gloo ranks."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_rank, args=(r, port, sources, queue), daemon=True) for r in range(2)]
    for process in ranks:
        process.start()
    try:
        results = dict(queue.get(timeout=600) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return results


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    pytest.importorskip("transformers")
    out = {}
    for name, overrides in MODELS.items():
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        save_tiny_hf_model(folder, name.split("-")[0], initializer_range=0.1, **overrides)
        write_byte_tokenizer(folder)
        out[name] = str(folder)
    return out


@pytest.fixture(scope="module")
def tp2(folders: dict[str, str]) -> dict[int, dict[str, Any]]:
    return run_tp2([*folders.values(), "dummy:tiny"])


@pytest.mark.parametrize("name", [*MODELS, "dummy:tiny"])
def test_tp2_matches_tp1(name: str, folders: dict[str, str], tp2: dict[int, dict[str, Any]]) -> None:
    source = folders.get(name, name)
    one, two = _results(source), tp2[0][source]
    logits_diff = max(float(np.abs(a - b).max()) for a, b in zip(one["logits"], two["logits"], strict=True))
    attention_diff = max(float(np.abs(a - b).max()) for a, b in zip(one["attention"], two["attention"], strict=True))
    print(f"{name}: TP=2 vs TP=1 logits max |diff| {logits_diff:.1e}, attention rows {attention_diff:.1e}")
    assert logits_diff <= 1e-5
    assert two["tokens"] == one["tokens"]  # prefill, then 32 decode steps on each rank's KV-head cache
    assert [a.shape for a in two["attention"]] == [a.shape for a in one["attention"]]  # every head, gathered
    assert attention_diff <= 1e-6
    assert tp2[1][source]["tokens"] == one["tokens"]  # the worker computed the same logits


@pytest.mark.parametrize("name", ["llama", "mixtral", "llama-kv1-tied"])
def test_each_rank_holds_its_share_of_the_weights(
    name: str, folders: dict[str, str], tp2: dict[int, dict[str, Any]]
) -> None:
    """Rank bytes = split bytes / 2 + replicated bytes (norms, router; KV heads where fewer than ranks)."""
    source = folders[name]
    whole = _results(source)["weight_bytes"]
    config = load_model(source, dtype=torch.float32).config
    for rank in (0, 1):
        with torch.device("meta"):
            expected = sum(p.numel() * 4 for p in LlamaForCausalLM(config, TensorParallel(rank, 2)).parameters())
        assert tp2[rank][source]["weight_bytes"] == expected
    ratio = tp2[0][source]["weight_bytes"] / whole
    print(f"{name}: each rank holds {ratio:.3f} of the model's weight bytes")
    assert 0.5 <= ratio < 0.6


@pytest.mark.parametrize("shape", ["llama-3-8b", "qwen3-8b", "mixtral-8x7b-4l"])
def test_shard_sizes_of_real_shapes(shape: str) -> None:
    """Real sizes on the meta device: each of 2 / 4 / 8 ranks holds 1/N of the weights (the norms and
    the router are whole on every rank: under 1 % more)."""
    config = named_config(shape)
    with torch.device("meta"):
        whole = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        for size in (2, 4, 8):
            held = sum(p.numel() for p in LlamaForCausalLM(config, TensorParallel(0, size)).parameters())
            assert whole / size <= held < whole / size * 1.01, (size, held / whole)


def test_a_model_that_does_not_split_is_refused_with_the_reason() -> None:
    from attnserve.model.errors import ModelLoadError

    config = named_config("tiny")  # 4 query heads
    with pytest.raises(ModelLoadError, match="tensor parallel size 3 does not divide its 4 query heads"):
        LlamaForCausalLM(config, TensorParallel(0, 3))


def test_sharded_load_fills_every_rank_parameter(tmp_path: Path) -> None:
    """Without a process group: each rank's part of a checkpoint loads into its shard's shapes."""
    pytest.importorskip("transformers")
    save_tiny_hf_model(tmp_path, "phi3", partial_rotary_factor=0.75, pad_token_id=0)  # fused qkv given whole
    write_byte_tokenizer(tmp_path)
    whole = load_model(tmp_path, dtype=torch.float32).model.state_dict()
    parts = [load_model(tmp_path, dtype=torch.float32, tp=TensorParallel(r, 2)).model.state_dict() for r in (0, 1)]
    name = "layers.0.self_attn.qkv_proj.weight"
    q, k, v = whole[name].split([4 * 16, 2 * 16, 2 * 16])
    expected = [
        torch.cat([q[r * 32 : (r + 1) * 32], k[r * 16 : (r + 1) * 16], v[r * 16 : (r + 1) * 16]]) for r in (0, 1)
    ]
    for r in (0, 1):
        assert torch.equal(parts[r][name], expected[r])
        assert torch.equal(
            parts[r]["layers.0.mlp.down_proj.weight"], whole["layers.0.mlp.down_proj.weight"][:, r * 64 : (r + 1) * 64]
        )
