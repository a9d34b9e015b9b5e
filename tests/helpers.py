"""Shared test helpers: run the model over a flattened batch with a fresh paged cache."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attnserve.model.attention import AttentionMetadata
from attnserve.model.kv_cache import KVCache
from attnserve.model.llama import LlamaForCausalLM


def scattered_block_tables(lengths: Sequence[int], block_size: int) -> list[list[int]]:
    """Block tables that interleave sequences' blocks (and skip block 0) so paging is really exercised."""
    needs = [-(-n // block_size) for n in lengths]
    tables: list[list[int]] = [[] for _ in lengths]
    next_block = 1
    for round_ in range(max(needs)):
        for i, need in enumerate(needs):
            if round_ < need:
                tables[i].append(next_block)
                next_block += 1
    return tables


def new_cache(model: LlamaForCausalLM, tables: Sequence[Sequence[int]], block_size: int) -> KVCache:
    num_blocks = 1 + max(b for t in tables for b in t)
    return KVCache.for_model(model, num_blocks=num_blocks, block_size=block_size)


@torch.inference_mode()
def forward_all(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], block_size: int = 16) -> list[torch.Tensor]:
    """Full-prompt logits (len_i, V) of several prompts computed in ONE flattened forward."""
    lengths = [len(p) for p in prompts]
    tables = scattered_block_tables(lengths, block_size)
    cache = new_cache(model, tables, block_size)
    meta = AttentionMetadata.build(block_tables=tables, seq_lens=lengths, query_lens=lengths, block_size=block_size)
    ids = torch.tensor([t for p in prompts for t in p])
    logits = model(ids, meta.positions, cache, meta)
    return list(logits.split(lengths))


TINY_HF_SHAPE = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)


def save_tiny_hf_model(folder: Path, architecture: str = "llama", **overrides: object) -> Any:
    """A random tiny transformers model saved as an HF folder (safetensors); returns the model.
    The tokenizer is the caller's to write."""
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    }
    config_class, model_class = (getattr(transformers, name) for name in classes[architecture])
    hf_model = model_class(config_class(**{**TINY_HF_SHAPE, **overrides}, attn_implementation="eager"))
    hf_model = hf_model.float().eval()
    hf_model.save_pretrained(folder, safe_serialization=True)
    return hf_model


def transformers_greedy(
    hf_model: Any, prompt: Sequence[int], max_new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own greedy ``generate`` (its cache, its sliding windows) past any EOS, as a
    request with ignore_eos runs: the new tokens and each step's logits (V,)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    # An unset eos_token_id is filled from the model's generation config: clear it there, for this call.
    saved, hf_model.generation_config.eos_token_id = hf_model.generation_config.eos_token_id, None
    try:
        with torch.inference_mode():
            out = hf_model.generate(torch.tensor([list(prompt)]), generation_config=config)
    finally:
        hf_model.generation_config.eos_token_id = saved
    return out.sequences[0, len(prompt) :].tolist(), [step[0].float() for step in out.logits]


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer for the tiny vocabulary (tokenizer.json, tokenizer_config.json): what
    load_model needs beside a tiny model's weights."""
    from attnserve.model.tokenizer import Tokenizer

    Tokenizer.byte_level(TINY_HF_SHAPE["vocab_size"]).backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def random_paged_cache(
    context_lens: Sequence[int],
    *,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random layer cache (2, num_blocks, block_size, Hkv, D) and shuffled int32 block tables (N, max_blocks).

    Block 0 is never handed out (padding rows point at it); tables are padded with 0.
    """
    gen = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // block_size) for n in context_lens))
    num_blocks = 1 + len(context_lens) * width
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).view(len(context_lens), width)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    for i, n in enumerate(context_lens):
        used = -(-n // block_size)
        tables[i, :used] = order[i, :used]
    return cache, tables


def reference_paged_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain float64 attention of the last n positions q (n, H, D) of a sequence over its cached context.

    Causal (each query over its last ``window`` positions, if given; scores soft-capped by ``softcap``);
    reads the context by copying its blocks. Returns (n, H, D) float64 (zeros when seq_len is 0).
    """
    n, num_heads, head_dim = q.shape
    if seq_len == 0:
        return torch.zeros(n, num_heads, head_dim, dtype=torch.float64)
    block_size, num_kv_heads = layer_cache.shape[2], layer_cache.shape[3]
    blocks = block_table[: -(-seq_len // block_size)].long()
    kv = layer_cache[:, blocks].reshape(2, -1, num_kv_heads, head_dim)[:, :seq_len].double()
    k = kv[0].repeat_interleave(num_heads // num_kv_heads, dim=1)  # (L, H, D)
    v = kv[1].repeat_interleave(num_heads // num_kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # (H, n, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    positions = torch.arange(seq_len - n, seq_len)
    hidden = torch.arange(seq_len)[None, :] > positions[:, None]  # (n, L) keys after each query
    if window is not None:
        hidden |= torch.arange(seq_len)[None, :] <= positions[:, None] - window
    weights = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def tiny_model_greedy_tokens(
    dtype: str = "float32", prompt: Sequence[int] = (5, 17, 99, 3, 42), steps: int = 24
) -> list[int]:
    """Greedy tokens of the random tiny model, loaded and prepared as the server loads it."""
    from attnserve.model.generate import generate_tokens
    from attnserve.model.loader import load_model, parse_dtype

    loaded = load_model("dummy:tiny", dtype=parse_dtype(dtype))
    with torch.inference_mode():
        return list(generate_tokens(loaded.model, list(prompt), max_tokens=steps))


def llama_cpp_converter() -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py`` from the sdist ``make llama-server`` unpacks
    (``$LLAMA_DIR`` or ``.cache/llama.cpp``), or None."""
    import os

    root = Path(os.environ.get("LLAMA_DIR") or Path(__file__).resolve().parents[1] / ".cache" / "llama.cpp")
    found = sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1] if found else None


# Runs the converter's main() in a fresh interpreter. With --any-pre it first replaces the check of
# a byte-level BPE tokenizer's pre-tokenizer hash (a table of real models' tokenizers, which no tiny
# test vocabulary can match) by the answer "qwen2"; tensors and metadata are untouched.
_CONVERT = """
import sys
from pathlib import Path
script, any_pre = sys.argv[1], sys.argv[2] == "1"
sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / "gguf-py")]
if any_pre:
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [script, *sys.argv[3:]]
import runpy
runpy.run_path(script, run_name="__main__")
"""


def convert_with_llama_cpp(folder: Path, out: Path, *, outtype: str = "f32", any_pre_tokenizer: bool = False) -> Path:
    """Convert an HF folder to GGUF with llama.cpp's own converter (the caller skips when
    :func:`llama_cpp_converter` finds none). Raises with the converter's output on failure."""
    import subprocess
    import sys

    script = llama_cpp_converter()
    assert script is not None, "llama.cpp's converter is not unpacked"
    argv = [str(folder), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(script), "1" if any_pre_tokenizer else "0", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return out


def write_sentencepiece_tokenizer(folder: Path, vocab_size: int = 384) -> None:
    """A tiny sentencepiece BPE model (``tokenizer.model``, byte fallback, exactly ``vocab_size``
    pieces, ids 0/1/2 = <unk>/<s>/</s>): what llama.cpp's converter reads for the sentencepiece
    families (Llama 2, Mistral, Gemma, Phi-3)."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "attention", "weights", "layer")
    text = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
