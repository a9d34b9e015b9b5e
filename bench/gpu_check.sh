#!/usr/bin/env bash
# Everything a session lent a GPU should run, as one prepared script (for the `device` tool):
#   1. the suite's GPU tests (-m gpu: Triton kernels compiled, bf16 invariance, CUDA graphs);
#   2. the kept benchmark: an 8B shape's decode at batch 1 and 64, context 2,048, against the roofline;
#   3. with two or more GPUs: the server at --tensor-parallel-size 2 on NCCL, greedy tokens against
#      TP=1, and the same benchmark points through the server.
# Results go to $OUT (the device tool brings that folder back). Needs the project installed (make install).
set -u
OUT=${OUT:-bench/results/gpu}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.csv"
$PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
$PY bench/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.txt"
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  for tp in 1 2; do
    $PY -m attnserve.server --model dummy:llama-3-8b --device cuda --dtype bfloat16 --tensor-parallel-size $tp \
      --port 50051 --http-port 0 --max-num-seqs 64 >"$OUT/server-tp$tp.log" 2>&1 &
    server=$!
    for _ in $(seq 300); do
      $PY -m attnserve.client info >/dev/null 2>&1 && break
      sleep 1
    done
    $PY -m attnserve.client generate --max-tokens 32 --temperature 0 "The capital of France is" >"$OUT/tokens-tp$tp.txt" 2>&1
    $PY -m attnserve.client.bench --target 127.0.0.1:50051 --concurrency 1 64 --input-len 2048 --output-len 64 \
      --json "$OUT/serve-tp$tp.json" --no-progress 2>&1 | tee "$OUT/serve-tp$tp.txt"
    kill -TERM $server; wait $server
  done
  cmp "$OUT/tokens-tp1.txt" "$OUT/tokens-tp2.txt" && echo "TP=1 and TP=2 greedy tokens identical" | tee "$OUT/tp_tokens.txt"
fi
