#!/usr/bin/env bash
# Build llama.cpp's llama-server (a benchmark peer, never a dependency) from the
# llama.cpp sources that ship inside the llama-cpp-python sdist on PyPI.
# About 5-6 minutes on 2 cores. Prints the binary's path.
set -euo pipefail
DEST=${LLAMA_DIR:-.cache/llama.cpp}
BIN="$DEST/build/bin/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
SRC=$(bash "$(dirname "$0")/fetch_llama_cpp.sh")
# LLAMA_USE_PREBUILT_UI=OFF: the build would otherwise download a web UI (no internet here).
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$DEST/build" --target llama-server -j "$(nproc)" >&2
echo "$BIN"
