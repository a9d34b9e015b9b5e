"""The kept GPU benchmark (bench/gpu_bench.py) runs: on CPU here, with a tiny shape, so that a session
lent a GPU finds it working. Its figures are only meaningful on a GPU."""

from __future__ import annotations

import importlib.util

from tests.server.server_process import REPO


def test_gpu_bench_runs_and_reports_each_point() -> None:
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu_bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = "--model dummy:tiny --device cpu --dtype float32 --batch 1 3 --context 40 --steps 1"
    rows = bench.main(args.split())
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 40), (3, 40)]
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 and r["tok_s"] > 0 for r in rows)
