#!/usr/bin/env bash
# Unpack llama.cpp's sources (its GGUF converter, and what `make llama-server` builds) from the
# llama-cpp-python sdist on PyPI, the one place they can be fetched here. Idempotent. Prints the
# source folder. Tests use the converter, convert_hf_to_gguf.py, as the reference GGUF writer.
set -euo pipefail
DEST=${LLAMA_DIR:-.cache/llama.cpp}
mkdir -p "$DEST"
if ! ls -d "$DEST"/llama_cpp_python-*/vendor/llama.cpp >/dev/null 2>&1; then
  ${PYTHON:-python3} -m pip download --quiet --no-deps --no-binary :all: -d "$DEST" llama-cpp-python >&2
  tar -xzf "$DEST"/llama_cpp_python-*.tar.gz -C "$DEST"
fi
ls -d "$DEST"/llama_cpp_python-*/vendor/llama.cpp
