"""Reading a Hugging Face model folder: config.json and (sharded) safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from attnserve.model.errors import ModelLoadError

# generation_config.json keys that are sampling defaults (the rest: token ids, lengths, flags).
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def generation_defaults(folder: Path) -> dict[str, float]:
    """The sampling defaults a model folder's generation_config.json sets (empty if none).

    ``do_sample: false`` means greedy whatever temperature it lists, as in transformers.
    """
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    found = {k: float(config[k]) for k in _SAMPLING_KEYS if isinstance(config.get(k), int | float)}
    if config.get("do_sample") is False:
        found["temperature"] = 0.0
    return found


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (convert pytorch_model.bin to safetensors)" if any(folder.glob("*.bin")) else ""
        raise ModelLoadError(f"{folder} holds no *.safetensors weights{hint}")
    return files


def safetensors_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for path in safetensors_files(folder):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
