"""`make bench-aiperf`: NVIDIA AIPerf, a load tool people compare LLM servers with, against attnserve's
OpenAI-compatible HTTP door; beside it our own load generator (client/bench.py) on the same load and the
same server, over HTTP and over gRPC.

    make bench-aiperf                                       # the default model: start a server, sweep, stop it
    python bench/third_party_load.py --model dummy:tiny --concurrency 1 4 --num-requests 8
    python bench/third_party_load.py --url http://127.0.0.1:8080 --grpc-target 127.0.0.1:50051   # one running

The load, for every tool: a closed loop of C requests in flight, N requests per point, prompts of about
--input-len tokens, exactly --output-len output tokens (ignore_eos, greedy), streamed from /v1/completions
(gRPC: GenerateStream). AIPerf counts its synthetic prompts with the model's own tokenizer, exported here to
a folder that transformers reads offline, and the output tokens from the server's usage.

AIPerf (PyPI `aiperf`, no torch) lives in its own venv, .cache/aiperf-venv, made on first use: its pins
(numpy, starlette, rich, ...) clash with ours. It runs several processes of its own: on a 2-core machine they
compete with the server for the CPUs, so read its figures beside ours, not alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from run_bench import free_port, start, stop, wait_http  # bench/ is the script's folder

from attnserve.client import bench

REPO = Path(__file__).resolve().parents[1]
AIPERF = "aiperf==0.13.0"
AIPERF_VENV = REPO / ".cache" / "aiperf-venv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from attnserve.model.fetch import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path()), help="served model (and its tokenizer)")
    p.add_argument("--url", default=None, help="a running server's HTTP door (default: start one on --model)")
    p.add_argument("--grpc-target", default=None, help="with --url: its gRPC door, for the gRPC row")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--num-requests", type=int, default=None, help="per point (default: max(4*C, 8))")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--tools", nargs="+", default=["aiperf", "ours-http", "ours-grpc"])
    p.add_argument("--aiperf", default=None, help="an aiperf executable (default: the venv in .cache, made if absent)")
    p.add_argument("--out", type=Path, default=Path("bench/results/third_party"))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- set-up
def aiperf_executable(given: str | None) -> Path:
    """aiperf in its own venv, installed on first use (constrained to our torch pin, though it needs none)."""
    if given:
        return Path(given)
    binary = AIPERF_VENV / "bin" / "aiperf"
    if not binary.exists():
        print(f"installing {AIPERF} into {AIPERF_VENV} (once, about 2 minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(AIPERF_VENV)], check=True)
        pip = [str(AIPERF_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "-c", str(REPO / "requirements" / "constraints.txt"), AIPERF], check=True)
    return binary


def export_tokenizer(model: str, folder: Path) -> Path:
    """The served model's tokenizer as a folder transformers' AutoTokenizer loads offline."""
    from attnserve.model.loader import DUMMY_PREFIX
    from attnserve.model.tokenizer import Tokenizer

    path = Path(model)
    if path.is_dir():
        return path  # a Hugging Face folder has its own tokenizer.json
    if model.startswith(DUMMY_PREFIX):
        from attnserve.model.config import named_config

        tokenizer = Tokenizer.byte_level(named_config(model[len(DUMMY_PREFIX) :]).vocab_size)
    else:
        from attnserve.model.gguf_file import GGUFFile

        tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    backend = tokenizer.backend
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": backend.id_to_token(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None,
        "eos_token": backend.id_to_token(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else None,
        "chat_template": tokenizer.chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "attnserve.server", "--model", args.model, "--dtype", args.dtype]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--http-host", "127.0.0.1", "--http-port", str(http_port)]
    cmd += ["--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--max-num-seqs", "64"]
    proc = start(cmd, args.out / "attnserve.log")
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_http(f"{url}/health", proc)  # 200 once the model is loaded and warm
    except BaseException:
        stop(proc)
        raise
    return proc, url, f"127.0.0.1:{port}"


def served_model(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as reply:
        return json.loads(reply.read())["data"][0]["id"]


# ---------------------------------------------------------------------------- runs
def run_aiperf(binary: Path, url: str, model: str, tokenizer: Path, c: int, args: argparse.Namespace) -> dict:
    out = args.out / f"aiperf-c{c}"
    cmd = [str(binary), "profile", "--model", model, "--url", url, "--endpoint-type", "completions", "--streaming"]
    cmd += ["--tokenizer", str(tokenizer), "--use-server-token-count", "--ui-type", "none", "--no-server-metrics"]
    cmd += ["--isl", str(args.input_len), "--prompt-input-tokens-stddev", "0"]
    cmd += ["--osl", str(args.output_len), "--prompt-output-tokens-stddev", "0"]
    cmd += ["--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0"]
    cmd += ["--concurrency", str(c), "--request-count", str(requests_at(c, args)), "--warmup-request-count", "1"]
    cmd += ["--random-seed", str(c), "--output-artifact-dir", str(out)]
    with open(args.out / f"aiperf-c{c}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=args.out)
    report = json.loads((out / "profile_export_aiperf.json").read_text())

    def metric(name: str, stat: str = "avg") -> float:
        return float((report.get(name) or {}).get(stat) or 0.0)

    requests = metric("request_count")
    failed = metric("error_request_count")
    return {
        "tool": "aiperf",
        "transport": "HTTP",
        "concurrency": c,
        "requests": int(requests + failed),
        "failed": int(failed),
        "output_tok_s": metric("output_token_throughput"),
        "request_throughput": metric("request_throughput"),
        "ttft_p50_ms": metric("time_to_first_token", "p50"),
        "ttft_p99_ms": metric("time_to_first_token", "p99"),
        "itl_p50_ms": metric("inter_token_latency", "p50"),
        "itl_p99_ms": metric("inter_token_latency", "p99"),
    }


def run_ours(backend: str, target: str, model: str, c: int, args: argparse.Namespace) -> dict:
    path = args.out / f"ours-{backend}-c{c}.json"
    argv = ["--backend", backend, "--target", target, "--model", model, "--concurrency", str(c)]
    argv += ["--num-requests", str(requests_at(c, args)), "--input-len", str(args.input_len)]
    argv += ["--output-len", str(args.output_len), "--seed", str(c), "--json", str(path), "--no-progress"]
    bench.main(argv)
    (row,) = json.loads(path.read_text())["results"]
    transport = "HTTP" if backend == "openai" else "gRPC"
    return {"tool": "client/bench.py", "transport": transport, **row}


def requests_at(c: int, args: argparse.Namespace) -> int:
    return args.num_requests or max(4 * c, 8)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nprompt ~{args.input_len} tokens, {args.output_len} output tokens (EOS ignored), greedy, "
        f"{os.cpu_count()} CPUs, model {Path(args.model).name}"
    )
    print("| tool | door | C | requests | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tool']} | {r['transport']} | {r['concurrency']} | {r['requests']} | {r['output_tok_s']:.1f} | "
            f"{r['request_throughput']:.2f} | {r['ttft_p50_ms'] or 0:.0f} / {r['ttft_p99_ms'] or 0:.0f} | "
            f"{r['itl_p50_ms'] or 0:.1f} / {r['itl_p99_ms'] or 0:.1f} | {r['failed']} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    binary = aiperf_executable(args.aiperf) if "aiperf" in args.tools else None
    proc, url, grpc_target = (None, args.url.rstrip("/"), args.grpc_target) if args.url else start_server(args)
    rows: list[dict] = []
    try:
        model = served_model(url)
        tokenizer = export_tokenizer(args.model, args.out / "tokenizer") if binary else None
        for c in args.concurrency:  # the tools interleaved per C, so drift over a long run hits all alike
            if binary and tokenizer:
                rows.append(run_aiperf(binary, url, model, tokenizer, c, args))
            if "ours-http" in args.tools:
                rows.append(run_ours("openai", url, model, c, args))
            if "ours-grpc" in args.tools and grpc_target:
                rows.append(run_ours("attnserve", grpc_target, model, c, args))
    finally:
        if proc is not None:
            stop(proc)
    print_table(rows, args)
    (args.out / "summary.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    )
    return 0 if rows and all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
