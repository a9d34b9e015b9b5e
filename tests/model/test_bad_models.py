"""Bad model paths give one clear error line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnserve.model.config import ModelConfig, named_config
from attnserve.model.errors import ModelLoadError
from attnserve.model.loader import load_model
from attnserve.model.tokenizer import Tokenizer
from tests.helpers import save_tiny_hf_model


def _write_gguf(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hf_folder_with_wrong_shapes(folder: Path) -> Path:
    pytest.importorskip("transformers")
    save_tiny_hf_model(folder, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    data = json.loads((folder / "config.json").read_text())
    data["hidden_size"] = 64  # the config now disagrees with the weights
    (folder / "config.json").write_text(json.dumps(data))
    Tokenizer.byte_level(384).backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def bad_models(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(200)) * 3)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_text("this is not a model")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    return {
        "missing": (tmp_path / "nope.gguf", "does not exist"),
        "corrupt": (corrupt, "not a readable GGUF"),
        "text file": (not_gguf, "not a readable GGUF"),
        "unsupported architecture": (_write_gguf(tmp_path / "falcon.gguf", "falcon"), "architecture 'falcon'"),
        "folder without config": (empty_dir, "no config.json"),
        "shape mismatch": (_hf_folder_with_wrong_shapes(tmp_path / "wrong"), "checkpoint shape"),
    }


def test_load_model_raises_actionable_errors(bad_models: dict[str, tuple[Path, str]]) -> None:
    for name, (path, message) in bad_models.items():
        with pytest.raises(ModelLoadError, match=message):
            load_model(path, dtype=torch.float32)
        print(f"{name}: ok")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "corrupt", "unsupported architecture", "shape mismatch"])
def test_cli_prints_one_line_and_exits_nonzero(bad_models: dict[str, tuple[Path, str]], case: str) -> None:
    path, message = bad_models[case]
    proc = subprocess.run(
        [sys.executable, "-m", "model", "generate", "hi", "--model", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_unknown_dummy_shape() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model shape 'huge'.*tiny"):
        load_model("dummy:huge")


def test_config_validation() -> None:
    tiny = named_config("tiny")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tiny.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="not supported"):
        tiny.replace(architecture="gpt2")
    with pytest.raises(ValueError, match="hidden_size must be > 0"):
        tiny.replace(hidden_size=0)


def test_named_shapes_have_the_published_sizes() -> None:
    assert abs(named_config("smollm2-135m").num_parameters() - 134.5e6) < 1e6
    assert abs(named_config("llama-3.2-1b").num_parameters() - 1.236e9) < 0.01e9
    assert abs(named_config("llama-3-8b").num_parameters() - 8.03e9) < 0.01e9


def test_config_from_hf_dict() -> None:
    cfg = ModelConfig.from_hf_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 100,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "eos_token_id": [5, 6],
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert cfg.head_dim == 16 and cfg.eos_token_ids == (5, 6) and cfg.rope_scaling is not None
    with pytest.raises(ModelLoadError, match="supported"):
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
