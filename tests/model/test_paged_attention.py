"""The paged cache gives the same numbers as a full forward, and the explicit path is exact."""

from __future__ import annotations

import math

import pytest
import torch

from attnserve.model.attention import AttentionMetadata, causal_mask
from attnserve.model.loader import LoadedModel
from attnserve.model.rope import apply_rotary
from tests.helpers import forward_all, new_cache, scattered_block_tables


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (11, 29)]


@pytest.mark.parametrize("block_size", [5, 16])
def test_prefill_then_32_cached_decode_steps_match_full_forward(tiny: LoadedModel, block_size: int) -> None:
    """Two sequences of different lengths in one flattened batch; block size does not divide them."""
    model, num_steps = tiny.model, 32
    prompts = _prompts(tiny.config.vocab_size)
    # Greedy continuation from a no-cache forward; the cache must then reproduce every step's logits.
    sequences = [list(p) for p in prompts]
    final_lengths = [len(p) + num_steps for p in prompts]
    tables = scattered_block_tables(final_lengths, block_size)
    cache = new_cache(model, tables, block_size)

    worst = 0.0
    new_tokens = [list(p) for p in prompts]
    with torch.inference_mode():
        for _ in range(num_steps + 1):
            seq_lens = [len(s) for s in sequences]
            query_lens = [len(n) for n in new_tokens]
            meta = AttentionMetadata.build(
                block_tables=tables, seq_lens=seq_lens, query_lens=query_lens, block_size=block_size
            )
            ids = torch.tensor([t for n in new_tokens for t in n])
            cached = model(ids, meta.positions, cache, meta).split(query_lens)
            full = forward_all(model, sequences)  # no history: everything recomputed
            for i, seq in enumerate(sequences):
                expected = full[i][len(seq) - query_lens[i] :]
                worst = max(worst, (cached[i] - expected).abs().max().item())
            if len(sequences[0]) == final_lengths[0]:
                break
            next_tokens = [int(full[i][-1].argmax()) for i in range(len(sequences))]
            for seq, token in zip(sequences, next_tokens, strict=True):
                seq.append(token)
            new_tokens = [[t] for t in next_tokens]
    assert worst <= 1e-5, f"cached logits differ from the full forward by {worst:.2e}"


def test_chunked_prefill_matches_single_prefill(tiny: LoadedModel) -> None:
    model, block_size = tiny.model, 4
    prompt = _prompts(tiny.config.vocab_size)[1]
    expected = forward_all(model, [prompt])[0]
    tables = scattered_block_tables([len(prompt)], block_size)
    cache = new_cache(model, tables, block_size)
    outputs = []
    with torch.inference_mode():
        for start, end in [(0, 7), (7, 20), (20, len(prompt))]:
            meta = AttentionMetadata.build(
                block_tables=tables, seq_lens=[end], query_lens=[end - start], block_size=block_size
            )
            outputs.append(model(torch.tensor(prompt[start:end]), meta.positions, cache, meta))
    assert (torch.cat(outputs) - expected).abs().max().item() <= 1e-5


def _reference_weights(model, prompt: list[int], layer: int) -> torch.Tensor:
    """softmax(QKᵀ/√d + causal mask) for one layer, recomputed here from the layer's own modules."""
    config = model.config
    with torch.inference_mode():
        x = model.embed_tokens(torch.tensor(prompt))
        positions = torch.arange(len(prompt))
        cos, sin = model.rotary(positions, x.dtype)
        captured = {}

        def grab(module, args, _out):
            captured["h"] = args[0]

        handle = model.layers[layer].self_attn.register_forward_hook(grab)
        forward_all(model, [prompt])
        handle.remove()
        attn = model.layers[layer].self_attn
        q, k, _ = attn.qkv_proj(captured["h"]).split([config.q_size, config.kv_size, config.kv_size], dim=-1)
        q = apply_rotary(q.view(len(prompt), config.num_heads, config.head_dim), cos, sin).transpose(0, 1)
        k = apply_rotary(k.view(len(prompt), config.num_kv_heads, config.head_dim), cos, sin).transpose(0, 1)
        k = k.repeat_interleave(config.num_heads // config.num_kv_heads, dim=0)
        scores = q @ k.transpose(1, 2) / math.sqrt(config.head_dim)
        mask = torch.tril(torch.ones(len(prompt), len(prompt), dtype=torch.bool))
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def test_explicit_attention_is_softmax_of_scores_and_matches_fused_output(tiny: LoadedModel) -> None:
    model, block_size = tiny.model, 8
    prompts = _prompts(tiny.config.vocab_size)
    lengths = [len(p) for p in prompts]
    tables = scattered_block_tables(lengths, block_size)
    ids = torch.tensor([t for p in prompts for t in p])
    with torch.inference_mode():
        # Ask for layer 1 of sequence 1 only.
        meta = AttentionMetadata.build(
            block_tables=tables,
            seq_lens=lengths,
            query_lens=lengths,
            block_size=block_size,
            attention_requests={1: [1]},
        )
        cache = new_cache(model, tables, block_size)
        logits = model(ids, meta.positions, cache, meta)
        assert set(meta.captured_queries) == {(1, 1)}, "queries only for the asked sequence and layer"
        first, weights = model.attention_weights(meta, cache, seq=1, layer=1)
    assert first == 0 and weights.shape == (tiny.config.num_heads, lengths[1], lengths[1])
    expected = _reference_weights(model, prompts[1], layer=1)
    assert (weights - expected).abs().max().item() <= 1e-6
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-6)
    fused = forward_all(model, prompts, block_size)
    assert torch.equal(logits, torch.cat(fused)), "asking for weights leaves every token on the fused path"


def test_explicit_attention_in_decode_batch(tiny: LoadedModel) -> None:
    """A decode step: weights for one of two sequences, a row over its whole context."""
    model, block_size = tiny.model, 4
    prompts = _prompts(tiny.config.vocab_size)
    lengths = [len(p) for p in prompts]
    tables = scattered_block_tables([n + 1 for n in lengths], block_size)
    cache = new_cache(model, tables, block_size)
    with torch.inference_mode():
        meta = AttentionMetadata.build(block_tables=tables, seq_lens=lengths, query_lens=lengths, block_size=block_size)
        model(torch.tensor([t for p in prompts for t in p]), meta.positions, cache, meta)
        nxt = [5, 7]
        meta = AttentionMetadata.build(
            block_tables=tables,
            seq_lens=[n + 1 for n in lengths],
            query_lens=[1, 1],
            block_size=block_size,
            attention_requests={0: [0, 1]},
        )
        model(torch.tensor(nxt), meta.positions, cache, meta)
        weights = {layer: model.attention_weights(meta, cache, seq=0, layer=layer) for layer in (0, 1)}
    for layer, (first, w) in weights.items():
        expected = _reference_weights(model, [*prompts[0], nxt[0]], layer)[:, -1:, :]
        assert first == lengths[0] and w.shape == expected.shape
        assert (w - expected).abs().max().item() <= 1e-6
    assert (1, 0) not in meta.captured_queries


def test_causal_mask_offsets_queries_to_the_end_of_context() -> None:
    mask = causal_mask(2, 4, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_metadata_rejects_block_table_too_short() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build(block_tables=[[0]], seq_lens=[5], query_lens=[5], block_size=4)
