"""One entry point for every weight source: an HF folder, a GGUF file, or dummy weights.

loaded = load_model("path/to/model.gguf", device="cpu", dtype=torch.float32)
loaded = load_model("path/to/hf-folder")
loaded = load_model("dummy:tiny")          # random weights of a named shape
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnserve.model.config import ModelConfig, named_config
from attnserve.model.errors import ModelLoadError
from attnserve.model.gguf_file import GGUFFile
from attnserve.model.hf_folder import generation_defaults, safetensors_weights
from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.parallel import TensorParallel
from attnserve.model.tokenizer import Tokenizer

DUMMY_PREFIX = "dummy:"


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    source: str
    generation_defaults: dict[str, float] = field(default_factory=dict)  # sampling defaults the model ships


def cpu_flags() -> str:
    """The CPU's vector extensions that decide the bf16 and fp32 kernels (benchmarks record them)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "no avx2"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Serving default: bf16 on CUDA and on CPUs with native bf16, else float32."""
    if torch.device(device).type == "cuda" or cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def parse_dtype(name: str) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return table[name]


def load_model(
    source: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """Load weights and tokenizer. Raises ModelLoadError with a one-line reason.

    With ``tp`` this process holds one rank's shard: checkpoint tensors are read one at a time and
    cut to the rank's part as they are copied in, so no rank ever holds the whole model.
    """
    dtype = dtype or default_dtype(device)
    text = str(source)
    if text.startswith(DUMMY_PREFIX):
        config = named_config(text[len(DUMMY_PREFIX) :])
        model = _build(config, device, torch.float32, tp)
        model.init_random(seed=seed)
        model = model.to(dtype).prepare_for_inference()
        return LoadedModel(config, model, Tokenizer.byte_level(config.vocab_size), text)

    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (run `make model` for the default model)")
    defaults: dict[str, float] = {}
    if path.is_dir():
        config = ModelConfig.from_hf_folder(path)
        tokenizer = Tokenizer.from_hf_folder(path)
        weights = safetensors_weights(path)
        defaults = generation_defaults(path)
    elif path.suffix == ".gguf":
        gguf = GGUFFile(path)
        config = gguf.model_config()
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
        weights = gguf.weights(config)
    else:
        raise ModelLoadError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    model = _build(config, device, dtype, tp)
    model.load_weights((name, t.to(dtype)) for name, t in weights)
    return LoadedModel(config, model.prepare_for_inference(), tokenizer, str(path), defaults)


def _build(
    config: ModelConfig, device: torch.device | str, dtype: torch.dtype, tp: TensorParallel | None
) -> LlamaForCausalLM:
    # Build on the meta device, then allocate uninitialised storage: no time spent
    # on a random init that the checkpoint overwrites.
    with torch.device("meta"):
        model = LlamaForCausalLM(config, tp)
    model = model.to_empty(device=device).to(dtype)
    return model.eval().requires_grad_(False)
