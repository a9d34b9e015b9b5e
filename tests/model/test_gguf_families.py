"""Each family's GGUF, as llama.cpp's own converter writes it, loads to the model its HF folder is.

Per family (all nine): a tiny random transformers model saved as an HF folder, converted by
``convert_hf_to_gguf.py`` (F32), then loaded both ways: configs equal, float32 logits within 1e-4
of transformers and of the HF-folder load; for the families new to GGUF, greedy tokens through
the engine equal to transformers' and a Q8_0 conversion within its quantisation step (slow).
Sentencepiece families get a tiny sentencepiece ``tokenizer.model`` (what the converter reads for
them); Qwen3-MoE's byte-level vocabulary needs the converter's pre-tokenizer hash check stubbed
(tests/helpers.py says why). Mixtral also as per-expert tensors (older files).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from attnserve.model.config import ModelConfig
from attnserve.model.loader import LoadedModel, load_model
from attnserve.model.rope import attention_factor
from attnserve.server.engine.request import SamplingParams
from tests.helpers import (
    convert_with_llama_cpp,
    forward_all,
    llama_cpp_converter,
    save_tiny_hf_model,
    write_byte_tokenizer,
    write_sentencepiece_tokenizer,
)
from tests.server.engine_utils import make_engine

WINDOW = 8
_LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.3, 1.7, 2.0, 2.5, 3.0],
    "long_factor": [1.5, 2.0, 4.0, 6.0, 8.0, 9.0],
}
# What each family changes, at tiny sizes. Gemma: query_pre_attn_scalar = head_dim, since a GGUF
# carries none (llama.cpp takes head_dim, hidden / heads for the 27B only); Gemma 3 with 6 layers,
# llama.cpp's 5:1 pattern; Qwen3-MoE renormalised, as llama.cpp always runs it.
FAMILIES: dict[str, dict[str, Any]] = {
    "gemma2": {
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": WINDOW,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "num_hidden_layers": 4,
    },
    "gemma3": {
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": WINDOW,
        "num_hidden_layers": 6,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
    # Phi-4-mini's partial rotary and LongRoPE with a 16-token original context (the prompts stay
    # within it: beyond it transformers switches factors per forward, we per position).
    "phi3": {
        "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 16,
        "rope_scaling": _LONGROPE,
        "pad_token_id": 0,
        "eos_token_id": 2,
    },
    "mixtral": {"num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 48},
    "qwen3_moe": {
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 40,
        "norm_topk_prob": True,
        "head_dim": 16,
    },
}
# The families GGUF loaded before: config and logits only (their engine paths are tested elsewhere).
# Mistral without a window (v0.2 on): llama.cpp's converter writes Mistral as "llama" and drops a
# window, so a windowed Mistral's GGUF attends to the whole context in llama.cpp and here alike.
FAMILIES |= {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 32}}
EARLIER = ("llama", "mistral", "qwen2", "qwen3")
GGUF_ARCHITECTURE = {"mistral": "llama"}
SENTENCEPIECE = ("gemma2", "gemma3", "phi3", "mixtral", "llama", "mistral", "qwen2", "qwen3")
LENGTHS = {"phi3": (3, 10, 16)}


@dataclasses.dataclass
class Converted:
    hf: Any  # the transformers model
    folder: LoadedModel
    gguf: LoadedModel
    gguf_path: Path
    hf_path: Path
    arch: str


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    if llama_cpp_converter() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not unpacked (make llama-server, or set LLAMA_DIR)")
    import transformers
    from filelock import FileLock

    arch = request.param
    # One conversion per family and session: xdist workers share the session's temporary folder
    # (pytest may also set a parametrised module fixture up again in one process).
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    folder = root / f"gguf-family-{arch}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / f"{arch}.gguf").is_file():
            _convert(arch, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    path = folder / f"{arch}.gguf"
    ours = load_model(folder, dtype=torch.float32)
    return Converted(hf.eval(), ours, load_model(path, dtype=torch.float32), path, folder, arch)


def _convert(arch: str, folder: Path) -> None:
    """The family's tiny random HF folder with both tokenizers, and its F32 GGUF inside it."""
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    hf = save_tiny_hf_model(folder, arch, initializer_range=0.1, **FAMILIES[arch])
    with torch.no_grad():  # random norms: a loader that dropped them (or Gemma's +1) would pass otherwise
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5) if arch.startswith("gemma") else param.uniform_(0.5, 1.5)
    hf.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder)  # tokenizer.json: what our HF-folder loader reads
    if arch in SENTENCEPIECE:
        write_sentencepiece_tokenizer(folder)
        # Phi-3's converter reads tokenizer_class (GPT2Tokenizer: Phi-4's vocabulary, else sentencepiece).
        config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "LlamaTokenizer"}
    else:  # byte-level BPE: bos / eos must be tokens of tokenizer.json, or transformers adds them past the vocab
        config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    convert_with_llama_cpp(folder, folder / f"{arch}.gguf.partial", any_pre_tokenizer=arch not in SENTENCEPIECE)
    (folder / f"{arch}.gguf.partial").rename(folder / f"{arch}.gguf")  # complete or absent


def prompts(arch: str, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=gen).tolist() for n in LENGTHS.get(arch, (3, WINDOW + 1, 40))]


def _close(a: Any, b: Any) -> bool:
    """Equal, floats to float32 precision (GGUF stores them as float32)."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return all(_close(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def test_the_gguf_config_is_the_hf_folders(converted: Converted) -> None:
    ours, theirs = converted.gguf.config, converted.folder.config
    theirs = theirs.replace(architecture=GGUF_ARCHITECTURE.get(converted.arch, theirs.architecture))
    if ours.rope_scaling is not None and theirs.rope_scaling is not None:
        # The converter writes LongRoPE's attention factor out (rope.scaling.attn_factor); the config
        # leaves it to be computed: the same number.
        assert attention_factor(ours.rope_scaling) == pytest.approx(attention_factor(theirs.rope_scaling), rel=1e-6)
        ours = ours.replace(rope_scaling=dataclasses.replace(ours.rope_scaling, attention_factor=None))
    skip = {"name", "aliases", "bos_token_id", "eos_token_ids"}  # the vocabularies differ (sentencepiece vs bytes)
    different = [
        f"{f.name}: {getattr(ours, f.name)!r} != {getattr(theirs, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in skip and not _close(getattr(ours, f.name), getattr(theirs, f.name))
    ]
    assert not different, different


def test_gguf_logits_match_transformers_and_the_hf_folder(converted: Converted) -> None:
    arch = converted.arch
    batch = prompts(arch)
    with torch.inference_mode():
        reference = [converted.hf(torch.tensor([p])).logits[0].float() for p in batch]
    from_gguf = forward_all(converted.gguf.model, batch)
    from_folder = forward_all(converted.folder.model, batch)
    vs_hf = max((a - b).abs().max().item() for a, b in zip(from_gguf, reference, strict=True))
    vs_folder = max((a - b).abs().max().item() for a, b in zip(from_gguf, from_folder, strict=True))
    print(f"{arch} GGUF (F32) max |logit diff|: {vs_hf:.2e} vs transformers, {vs_folder:.2e} vs the HF folder")
    assert vs_hf <= 1e-4 and vs_folder <= 1e-4, (vs_hf, vs_folder)


def test_gguf_greedy_tokens_through_the_engine_match_transformers(converted: Converted) -> None:
    arch = converted.arch
    if arch in EARLIER:
        pytest.skip("loaded from GGUF before; its engine path is tested on its HF folder")
    engine = make_engine(converted.gguf, max_num_batched_tokens=12, block_size=4)
    try:
        # Phi-3: prompt and tokens within the 16-token original context (see prompts()).
        prompt = torch.randint(3, 384, (8 if arch == "phi3" else 30,), generator=torch.Generator().manual_seed(1))
        prompt = prompt.tolist()
        out = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True)))
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(8):
                ids.append(int(converted.hf(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt) :]
    finally:
        engine.shutdown(5)


def _rewrite(source: Path, dest: Path, tensors: list[tuple[str, Any]]) -> None:
    """A GGUF with ``source``'s metadata and the given (name, float32 array) tensors."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_per_expert_gguf_tensors_load_as_the_merged_ones(converted: Converted, tmp_path: Path) -> None:
    """Files from before llama.cpp merged its experts name each one: blk.N.ffn_{gate,up,down}.E."""
    if converted.arch != "mixtral":
        pytest.skip("the per-expert layout is Mixtral's (llama.cpp's first MoE)")
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(converted.gguf_path)
    tensors: list[tuple[str, Any]] = []
    for t in reader.tensors:
        array = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("_exps.weight"):  # blk.N.ffn_gate_exps.weight -> blk.N.ffn_gate.E.weight
            stem = t.name.removesuffix("_exps.weight")
            tensors += [(f"{stem}.{e}.weight", array[e]) for e in range(array.shape[0])]
        else:
            tensors.append((t.name, array))
    assert any(".ffn_down.5.weight" in name for name, _ in tensors)
    path = tmp_path / "per-expert.gguf"
    _rewrite(converted.gguf_path, path, tensors)
    per_expert = load_model(path, dtype=torch.float32)
    batch = prompts("mixtral")
    for a, b in zip(forward_all(per_expert.model, batch), forward_all(converted.gguf.model, batch), strict=True):
        assert torch.equal(a, b)


def test_the_sentencepiece_vocabulary_encodes_as_sentencepiece(converted: Converted) -> None:
    """A "llama" GGUF vocabulary (merges rebuilt from the pieces' scores, byte fallback) splits text
    as the tokenizer.model it came from (with the space prefix the converter keeps for Llama / Phi-3)."""
    arch = converted.arch
    if arch not in ("mixtral", "phi3"):
        pytest.skip("Gemma's files drop the space prefix; Qwen's vocabulary is byte-level BPE")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(converted.hf_path / "tokenizer.model"))
    ours = converted.gguf.tokenizer
    for text in ("the quick brown fox", "a lazy  dog jumps over attention weights", "layer é ß 漢字 ~!", "  x\ny"):
        assert ours.encode(text) == [1, *sp.encode(text)], text
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


@pytest.mark.slow  # a second converter run per family (about 10 s each here)
def test_a_q8_0_gguf_loads_each_weight_within_its_quantisation_step(converted: Converted) -> None:
    """Quantised by the converter (Q8_0: 32 weights per block, step = block max / 127): every weight
    within about half a step of the F32 file's (a misplaced row or shard would be off by up to 254
    steps), 1-D tensors (norms, Gemma's 1 + w included) exact."""
    arch = converted.arch
    if arch not in ("gemma2", "phi3", "mixtral"):
        pytest.skip("one family per kind of tensor layout keeps the suite fast")
    import gguf

    path = convert_with_llama_cpp(converted.hf_path, converted.hf_path.parent / f"{arch}.q8_0.gguf", outtype="q8_0")
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in gguf.GGUFReader(path).tensors)
    quantised = dict(load_model(path, dtype=torch.float32).model.named_parameters())
    for name, exact in converted.gguf.model.named_parameters():
        if exact.dim() == 1:
            assert torch.equal(quantised[name], exact), name
        else:
            step = exact.abs().amax() / 127
            # Half a step, plus the float16 rounding of each block's scale (127 steps x 2^-11 < 0.1 step).
            error = (quantised[name] - exact).abs().max()
            assert error <= 0.6 * step, (name, error, step)


def _gemma_meta(arch: str, layers: int, **extra: Any) -> dict[str, Any]:
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": layers,
        f"{arch}.embedding_length": 4608,
        f"{arch}.attention.head_count": 32,
        f"{arch}.attention.head_count_kv": 16,
        f"{arch}.attention.key_length": 128,
        f"{arch}.feed_forward_length": 36864,
        f"{arch}.context_length": 8192,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.attention.sliding_window": 4096,
        f"{arch}.vocab_size": 256000,
    }
    return meta | extra


def test_gemma_gguf_metadata_rules_are_llama_cpps() -> None:
    """What a Gemma GGUF does not say is decided as llama.cpp decides it (src/models/gemma2.cpp,
    gemma3.cpp, llama_model_base::load_swa_pattern): the 27B's query scale is hidden / heads (144),
    others' head_dim; sliding layers by period (2, 6) or an explicit per-layer array."""
    big = ModelConfig.from_gguf_metadata(_gemma_meta("gemma2", 46))
    assert big.attention_scale == pytest.approx(144**-0.5)
    assert big.sliding_layers is not None and big.sliding_layers[:4] == (True, False, True, False)
    nine_b = ModelConfig.from_gguf_metadata(_gemma_meta("gemma2", 42))
    assert nine_b.attention_scale == pytest.approx(128**-0.5)
    gemma3 = ModelConfig.from_gguf_metadata(_gemma_meta("gemma3", 12))
    assert gemma3.sliding_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert gemma3.rope_local_theta == 10000.0  # llama.cpp's default without rope.freq_base_swa
    pattern = [True, False, False]
    explicit = ModelConfig.from_gguf_metadata(
        _gemma_meta("gemma3", 3, **{"gemma3.attention.sliding_window_pattern": pattern})
    )
    assert explicit.sliding_layers == tuple(pattern)
    no_window = ModelConfig.from_gguf_metadata(_gemma_meta("gemma3", 6, **{"gemma3.attention.sliding_window": 0}))
    assert no_window.sliding_window is None and no_window.sliding_layers is None


def test_a_qwen3moe_gguf_is_renormalised_unless_it_says_otherwise() -> None:
    meta = {
        "general.architecture": "qwen3moe",
        "qwen3moe.block_count": 2,
        "qwen3moe.embedding_length": 64,
        "qwen3moe.attention.head_count": 4,
        "qwen3moe.attention.key_length": 16,
        "qwen3moe.feed_forward_length": 128,
        "qwen3moe.context_length": 256,
        "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6,
        "qwen3moe.vocab_size": 384,
        "qwen3moe.expert_count": 8,
        "qwen3moe.expert_used_count": 2,
        "qwen3moe.expert_feed_forward_length": 32,
    }
    config = ModelConfig.from_gguf_metadata(meta)
    assert (config.architecture, config.num_experts, config.num_experts_per_tok) == ("qwen3_moe", 8, 2)
    assert config.expert_intermediate_size == 32 and config.norm_topk_prob and config.qk_norm
    meta["qwen3moe.expert_weights_norm"] = False
    assert not ModelConfig.from_gguf_metadata(meta).norm_topk_prob
