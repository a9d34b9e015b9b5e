"""`make bench`: start each server, drive it with client/bench.py, stop it; print one table.

Systems (same prompts, lengths and generator for all):
  attnserve     python -m server on the default model
  transformers  bench/hf_server.py: transformers generate, one request at a time
  llama-server  llama.cpp's server on the same GGUF, as many slots as the concurrency
                (build it with bench/build_llama_server.sh; skipped if absent)
Also, in the same run:
  - gRPC overhead: the engine offline against the same load through the server, at C=32;
  - attention overhead: the attnserve sweep again with 25% of requests asking for
    last-layer attention, and the output tok/s of the other 75%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from attnserve.client import bench
from attnserve.model.fetch import default_model_path
from attnserve.model.loader import cpu_flags, default_dtype

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def sweep(backend: str, target: str, label: str, args: argparse.Namespace, out: Path, extra: list[str]) -> list[dict]:
    path = out / f"{label}.json"
    bench.main(
        [
            "--backend",
            backend,
            "--target",
            target,
            "--label",
            label,
            "--requests-per-concurrency",
            str(args.requests_per_concurrency),
            "--concurrency",
            *map(str, args.concurrency),
            "--input-len",
            str(args.input_len),
            "--output-len",
            str(args.output_len),
            "--json",
            str(path),
            "--png",
            str(out / f"{label}.png"),
            *extra,
        ]
    )
    return json.loads(path.read_text())["results"]


def offline_engine(model: str, dtype: str, concurrency: int, args: argparse.Namespace) -> float:
    """The engine in-process, no gRPC, on the same prompts as the sweep's C point."""
    from attnserve.model.loader import load_model, parse_dtype
    from attnserve.server.engine.config import CacheConfig, EngineConfig
    from attnserve.server.engine.core import build_engine
    from attnserve.server.engine.request import SamplingParams

    config = EngineConfig(cache=CacheConfig(kv_cache_memory=1 << 30))
    engine = build_engine(lambda: load_model(model, dtype=parse_dtype(dtype)), config).start()
    loaded = engine.loaded
    n = max(args.requests_per_concurrency * concurrency, 4)
    prompts = bench.make_prompts(n, args.input_len, args.output_len, "random", concurrency)
    ids = [loaded.tokenizer.encode(p.text) for p in prompts]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)

    async def run() -> int:
        queue, produced = list(ids), 0

        async def worker() -> None:
            nonlocal produced
            while queue:
                out = await engine.generate(queue.pop(), params)
                produced += len(out.token_ids)  # after the await: `x += await ...` would lose updates

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return produced

    asyncio.run(engine.generate(ids[0][:4], SamplingParams(max_tokens=2)))
    t = time.perf_counter()
    produced = asyncio.run(run())
    rate = produced / (time.perf_counter() - t)
    engine.shutdown(5)
    return rate


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument(
        "--dtype",
        default=str(default_dtype("cpu")).removeprefix("torch."),
        help="attnserve's and transformers' dtype: by default the one the server picks on this CPU",
    )
    p.add_argument(
        "--also-dtype",
        default="other",
        help="a second attnserve row in this dtype (plain sweep only); default: the other of bfloat16 and "
        "float32, so `make bench` shows both; 'none' for one row",
    )
    p.add_argument("--systems", nargs="+", default=["attnserve", "transformers", "llama-server"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--requests-per-concurrency", type=int, default=1, help="requests per point: max(k*C, 4)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", ".cache/llama.cpp/build/bin/llama-server"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    if args.also_dtype == "other":
        args.also_dtype = "float32" if args.dtype == "bfloat16" else "bfloat16"
    elif args.also_dtype == "none":
        args.also_dtype = None
    return args


def at(args: argparse.Namespace, concurrency: int) -> argparse.Namespace:
    """The run's arguments for one concurrency point."""
    return argparse.Namespace(**{**vars(args), "concurrency": [concurrency]})


def run_attnserve(
    args: argparse.Namespace, table: dict[str, list[dict]], extras: dict[str, float], *, dtype: str | None = None
) -> None:
    """The default dtype's sweep (with its attention twin and the offline engine), or with ``dtype``
    another dtype's plain sweep as the row "attnserve <dtype>"."""
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "attnserve.server", "--model", args.model, "--dtype", dtype or args.dtype]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1", "--metrics-port", str(mport)]
    cmd += ["--http-host", "127.0.0.1", "--http-port", str(free_port())]
    proc = start([*cmd, "--max-num-seqs", "64"], args.out / "attnserve.log")
    try:
        wait_http(f"http://127.0.0.1:{mport}/metrics", proc)
        from attnserve.client import Client

        with Client(f"127.0.0.1:{port}") as c:
            while c.health() != "SERVING":
                time.sleep(0.5)
        # Plain and 25%-attention points interleaved per C, so drift over a long run hits both alike.
        target = f"127.0.0.1:{port}"
        for c in args.concurrency:
            if dtype is not None:
                plain = sweep("attnserve", target, f"attnserve-{dtype}-c{c}", at(args, c), args.out, [])
                table.setdefault(f"attnserve {dtype}", []).extend(plain)
                continue
            plain = sweep("attnserve", target, f"attnserve-c{c}", at(args, c), args.out, [])
            table.setdefault("attnserve", []).extend(plain)
            attention_flags = ["--attention-every", "4", "--seed", "1000"]  # other prompts: no prefix-cache hits
            with_attention = sweep(
                "attnserve", target, f"attnserve-attention-c{c}", at(args, c), args.out, attention_flags
            )
            table.setdefault("attnserve +25% attention", []).extend(with_attention)
    finally:
        stop(proc)
    if dtype is not None:
        return
    c_max = max(args.concurrency)
    extras[f"engine offline C={c_max}"] = offline_engine(args.model, args.dtype, c_max, args)


def run_transformers(args: argparse.Namespace, table: dict[str, list[dict]]) -> None:
    port = free_port()
    proc = start(
        [sys.executable, "bench/hf_server.py", "--model", args.model, "--port", str(port), "--dtype", args.dtype],
        args.out / "transformers.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        table["transformers"] = sweep("openai", f"http://127.0.0.1:{port}", "transformers", args, args.out, [])
    finally:
        stop(proc)


def run_llama_server(args: argparse.Namespace, table: dict[str, list[dict]]) -> None:
    llama = shutil.which(args.llama_server) or (args.llama_server if Path(args.llama_server).is_file() else None)
    if llama is None:
        print(f"llama-server not found at {args.llama_server}: run bench/build_llama_server.sh", file=sys.stderr)
        return
    rows = []
    for c in args.concurrency:  # as many parallel slots as the concurrency
        port = free_port()
        ctx = c * (args.input_len * 2 + args.output_len + 64)
        cmd = [llama, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "-np", str(c), "-c", str(ctx)]
        proc = start([*cmd, "-t", str(os.cpu_count() or 2), "--no-webui"], args.out / f"llama-{c}.log")
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc)
            rows += sweep("openai", f"http://127.0.0.1:{port}", f"llama-server-c{c}", at(args, c), args.out, [])
        finally:
            stop(proc)
    table["llama-server"] = rows


def print_table(table: dict[str, list[dict]], args: argparse.Namespace) -> None:
    print(
        f"\nprompt ~{args.input_len} tokens, {args.output_len} output tokens (EOS ignored), greedy, "
        f"{os.cpu_count()} CPUs ({cpu_flags()}), attnserve/transformers in {args.dtype} (the server's default "
        "here)" + (f", 'attnserve {args.also_dtype}' in {args.also_dtype}" if args.also_dtype else "")
    )
    print("| system | C | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | failed |")
    print("|---|---|---|---|---|---|")
    for name, rows in table.items():
        for r in rows:
            print(
                f"| {name} | {r['concurrency']} | {r['output_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} / "
                f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} | {r['failed']} |"
            )


def print_ratios(table: dict[str, list[dict]], extras: dict[str, float], args: argparse.Namespace) -> None:
    by = {name: {r["concurrency"]: r for r in rows} for name, rows in table.items()}
    ours = by.get("attnserve", {})
    if "transformers" in by and 16 in ours:
        ratio = ours[16]["output_tok_s"] / by["transformers"][16]["output_tok_s"]
        print(f"attnserve C=16 / transformers C=16: {ratio:.2f}x")
    for c in (1, 16, 32):
        if c in ours and c in by.get("llama-server", {}):
            ratio = ours[c]["output_tok_s"] / by["llama-server"][c]["output_tok_s"]
            print(f"attnserve / llama-server at C={c}: {ratio:.2f}x")
    c_max = max(args.concurrency)
    if extras and c_max in ours:
        offline = extras[f"engine offline C={c_max}"]
        print(
            f"engine offline C={c_max}: {offline:.1f} tok/s; through gRPC: {ours[c_max]['output_tok_s']:.1f} "
            f"({ours[c_max]['output_tok_s'] / offline - 1:+.1%})"
        )
    for c, row in by.get("attnserve +25% attention", {}).items():
        if c in ours and "plain_tpot_mean_ms" in row:
            print(
                f"C={c}: mean TPOT of requests without attention {row['plain_tpot_mean_ms']:.1f} ms with 25% asking "
                f"vs {ours[c]['tpot_mean_ms']:.1f} ms with none; total tok/s {row['output_tok_s']:.1f} vs "
                f"{ours[c]['output_tok_s']:.1f}"
            )


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table: dict[str, list[dict]] = {}
    extras: dict[str, float] = {}
    if "attnserve" in args.systems:
        run_attnserve(args, table, extras)
        if args.also_dtype:
            run_attnserve(args, table, extras, dtype=args.also_dtype)
    if "transformers" in args.systems:
        run_transformers(args, table)
    if "llama-server" in args.systems:
        run_llama_server(args, table)
    for name, rows in table.items():  # one throughput/latency-vs-concurrency plot per system
        bench.plot(args.out / f"{name.replace(' ', '_').replace('%', 'pct')}.png", name, rows)
    print_table(table, args)
    print_ratios(table, extras, args)
    (args.out / "summary.json").write_text(json.dumps({"table": table, "extras": extras}, indent=2))


if __name__ == "__main__":
    main()
