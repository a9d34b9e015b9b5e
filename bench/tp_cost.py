"""What tensor parallelism costs on CPU (gloo): the same server at TP=1 and TP=2, side by side.

On one CPU the ranks share the same cores and memory bandwidth, so TP=2 cannot be faster; this
measures what its collectives and the broadcast plan cost (the CPU path exists for tests). The
servers alternate round by round, so drift on a shared machine hits both alike.

    python bench/tp_cost.py --model dummy:llama-3.2-1b --dtype bfloat16 --concurrency 1 8 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attnserve.client import Client  # noqa: E402
from attnserve.model.loader import cpu_flags  # noqa: E402
from bench.run_bench import at, free_port, start, stop, sweep, wait_http  # noqa: E402


def run(tp: int, args: argparse.Namespace, label: str) -> list[dict]:
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "attnserve.server", "--model", args.model, "--dtype", args.dtype]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1", "--metrics-port", str(mport)]
    cmd += ["--http-port", "0", "--kv-cache-memory", "256MiB", "--tensor-parallel-size", str(tp)]
    proc = start(cmd, args.out / f"{label}.log")
    try:
        wait_http(f"http://127.0.0.1:{mport}/metrics", proc)
        with Client(f"127.0.0.1:{port}") as client:
            while client.health() != "SERVING":
                time.sleep(0.5)
        return [
            r
            for c in args.concurrency
            for r in sweep("attnserve", f"127.0.0.1:{port}", f"{label}-c{c}", at(args, c), args.out, [])
        ]
    finally:
        stop(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dummy:llama-3.2-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--requests-per-concurrency", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/tp_cost"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{args.model} {args.dtype}, CPU {cpu_flags()}")
    print("round  C   TP=1 tok/s  TP=2 tok/s  TP=2/TP=1")
    for round_ in range(args.rounds):
        one = run(1, args, f"tp1-r{round_}")
        two = run(2, args, f"tp2-r{round_}")
        for a, b in zip(one, two, strict=True):
            rate1, rate2 = a["output_tok_s"], b["output_tok_s"]
            print(f"{round_:5d} {a['concurrency']:3d} {rate1:11.1f} {rate2:11.1f} {rate2 / rate1:10.2f}")


if __name__ == "__main__":
    main()
