"""Load generator for attnserve and OpenAI-compatible HTTP servers, in the spirit of `vllm bench serve`.

    python -m client.bench --backend attnserve --target localhost:50051 --concurrency 1 2 4 8 16 32
    python -m client.bench --backend openai --target http://127.0.0.1:8080 --rate 2.0 --num-requests 64

Closed loop (`--concurrency C ...`: C requests always in flight) or open loop (`--rate R`:
Poisson arrivals at R requests/s). Prompts: random fixed-length text (`--input-len`,
`--output-len`), or a mixed-length set (`--dataset mixed`). EOS is ignored so every
request generates exactly its output length. Reports request throughput, output tok/s,
TTFT / ITL / TPOT / E2E at p50, p90, p99 and goodput at given SLOs; writes JSON and,
with matplotlib, a PNG of throughput and latency against concurrency.

Only grpc and the standard library: no torch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

_WORDS = [
    "the",
    "model",
    "attends",
    "to",
    "every",
    "token",
    "before",
    "it",
    "and",
    "predicts",
    "the",
    "next",
    "one",
    "from",
    "what",
    "it",
    "saw",
    "time",
    "river",
    "mountain",
    "green",
    "quickly",
    "because",
    "under",
    "seven",
    "silver",
    "paper",
    "window",
    "music",
    "coffee",
    "engine",
    "yellow",
    "market",
    "ocean",
    "history",
    "garden",
    "number",
    "travel",
    "winter",
    "science",
    "people",
]


@dataclass
class RequestResult:
    ok: bool
    asked_attention: bool = False
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass
class Prompt:
    text: str
    output_len: int
    attention: bool = False  # ask for last-layer attention (attnserve only)


def make_prompts(
    num: int, input_len: int, output_len: int, dataset: str, seed: int, attention_every: int = 0
) -> list[Prompt]:
    """Random word prompts of about input_len tokens (a word is about a token), or mixed lengths.
    With attention_every=k, every k-th request asks for last-layer attention."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num):
        if dataset == "mixed":
            n_in, n_out = rng.choice([16, 64, 256, 512]), rng.choice([16, 64, 128, 256])
        else:
            n_in, n_out = input_len, output_len
        asks = attention_every > 0 and i % attention_every == 0
        prompts.append(Prompt(" ".join(rng.choice(_WORDS) for _ in range(n_in)), n_out, asks))
    return prompts


# --------------------------------------------------------------------- backends
def attnserve_call(target: str, token: str | None) -> Callable[[Prompt], RequestResult]:
    from attnserve.client.client import Client

    local = threading.local()

    def call(prompt: Prompt) -> RequestResult:
        if not hasattr(local, "client"):
            local.client = Client(target, token=token, timeout=600)
        extra = {"attention_layers": [-1]} if prompt.attention else {}

        def messages():
            for m in local.client.generate_stream(
                prompt.text, max_tokens=prompt.output_len, ignore_eos=True, temperature=0.0, **extra
            ):
                yield len(m.token_ids), m.text

        result = _timed(messages)
        result.asked_attention = prompt.attention
        return result

    return call


def openai_call(base_url: str, model: str | None, token: str | None = None) -> Callable[[Prompt], RequestResult]:
    """Streaming /v1/completions (attnserve's HTTP door, llama-server, the transformers baseline, vLLM, ...).

    A token per event as it arrives; the count is then corrected to the server's usage when it sends one
    (stream_options.include_usage): an event may carry no text (a UTF-8 character split across tokens)."""
    url = urllib.parse.urlparse(base_url)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})

    def events(prompt: Prompt, usage: dict):
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=600)
        body = {
            **({"model": model} if model else {}),  # none: the server's own (attnserve 404s a wrong name)
            "prompt": prompt.text,
            "max_tokens": prompt.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        conn.request("POST", url.path.rstrip("/") + "/v1/completions", json.dumps(body), headers)
        reply = conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()[:200]!r}")
        try:
            for raw in reply:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                usage.update(event.get("usage") or {})
                for choice in event.get("choices") or ():  # the usage event has none
                    text = choice.get("text", "")
                    if text or choice.get("finish_reason") is None:
                        yield 1, text
        finally:
            conn.close()

    def call(prompt: Prompt) -> RequestResult:
        usage: dict = {}
        result = _timed(lambda: events(prompt, usage))
        if result.ok and "completion_tokens" in usage:
            result.output_tokens = usage["completion_tokens"]
        return result

    return call


def _timed(stream: Callable[[], object]) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=True)
    last = None
    try:
        for n, _text in stream():  # type: ignore[attr-defined]
            if n == 0:
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - start
            else:
                result.itls.extend([(now - last) / n] * n)
            last = now
            result.output_tokens += n
        result.e2e = time.perf_counter() - start
    except Exception as exc:  # a failed request is counted, not fatal
        result.ok, result.error, result.e2e = False, f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start
    return result


# ------------------------------------------------------------------------ loads
def run_closed_loop(
    call: Callable[[Prompt], RequestResult], prompts: Sequence[Prompt], concurrency: int, progress: Progress
) -> tuple[list[RequestResult], float]:
    queue = list(reversed(prompts))
    lock = threading.Lock()
    results: list[RequestResult] = []

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                prompt = queue.pop()
            result = call(prompt)
            with lock:
                results.append(result)
                progress.tick()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    return results, time.perf_counter() - start


def run_poisson(
    call: Callable[[Prompt], RequestResult], prompts: Sequence[Prompt], rate: float, seed: int, progress: Progress
) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    results: list[RequestResult] = []
    lock = threading.Lock()

    def one(prompt: Prompt) -> None:
        result = call(prompt)
        with lock:
            results.append(result)
            progress.tick()

    start = time.perf_counter()
    with ThreadPoolExecutor(max(8, min(256, int(rate * 60)))) as pool:
        for prompt in prompts:
            pool.submit(one, prompt)
            time.sleep(rng.expovariate(rate))
    return results, time.perf_counter() - start


class Progress:
    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.done, self.label, self.enabled = total, 0, label, enabled

    def tick(self) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            print(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}",
                end="",
                file=sys.stderr,
                flush=True,
            )
            if self.done == self.total:
                print(file=sys.stderr)


# ---------------------------------------------------------------------- report
def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float, *, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    stats: dict = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tok_s": out_tokens / duration,
        "output_tokens": out_tokens,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "itl": [x for r in ok for x in r.itls],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "e2e": [r.e2e for r in ok],
    }
    for name, values in series.items():
        for q in (50, 90, 99):
            stats[f"{name}_p{q}_ms"] = None if not values else 1000 * percentile(values, q)  # type: ignore[operator]
        stats[f"{name}_mean_ms"] = None if not values else 1000 * statistics.fmean(values)
    good = [r for r in ok if r.ttft <= slo_ttft and (r.tpot or 0.0) <= slo_tpot]
    stats["goodput_req_s"] = len(good) / duration
    plain = [r for r in ok if not r.asked_attention]
    if len(plain) < len(ok):  # some asked for attention: what did the others get?
        stats["plain_output_tok_s"] = sum(r.output_tokens for r in plain) / duration
        stats["plain_tpot_mean_ms"] = 1000 * statistics.fmean([r.tpot for r in plain if r.tpot is not None])
    stats["slo"] = {"ttft_s": slo_ttft, "tpot_s": slo_tpot}
    if len(ok) < len(results):
        stats["first_error"] = next(r.error for r in results if not r.ok)
    return stats


def plot(path: Path, label: str, rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cs = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(cs, [r["output_tok_s"] for r in rows], marker="o")
    a.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title=f"{label}: throughput")
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o--"), ("itl_p50_ms", "s-"), ("itl_p99_ms", "s--")):
        b.plot(cs, [r[key] or 0.0 for r in rows], style, label=key.replace("_ms", ""))
    b.set(xscale="log", xlabel="concurrency", ylabel="ms", title=f"{label}: latency")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _wait_serving(target: str, token: str | None, timeout: float = 300.0) -> None:
    from attnserve.client.client import Client

    deadline = time.monotonic() + timeout
    with Client(target, token=token) as c:
        while time.monotonic() < deadline:
            try:
                if c.health() == "SERVING":
                    return
            except Exception:
                pass
            time.sleep(0.5)
    raise SystemExit(f"{target} is not SERVING after {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.bench", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["attnserve", "openai"], default="attnserve")
    p.add_argument("--target", default="localhost:50051", help="host:port (attnserve) or http://host:port")
    p.add_argument("--model", default=None, help="model name sent to OpenAI-compatible servers (default: none)")
    p.add_argument("--token", default=None, help="bearer token (both backends)")
    p.add_argument("--label", default=None, help="name in the report (default: the backend)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=None, help="per point (default: max(k*C, 4), k below)")
    p.add_argument("--requests-per-concurrency", type=int, default=2, help="k: requests per point per unit of C")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dataset", choices=["random", "mixed"], default="random")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on TTFT, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="goodput SLO on TPOT, seconds")
    p.add_argument(
        "--attention-every",
        type=int,
        default=0,
        help="every k-th request asks for last-layer attention (attnserve; 4 = 25%%)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--png", type=Path, default=None, help="plot throughput and latency here (matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    label = a.label or a.backend
    call = attnserve_call(a.target, a.token) if a.backend == "attnserve" else openai_call(a.target, a.model, a.token)
    if a.backend == "attnserve":
        _wait_serving(a.target, a.token)
    call(Prompt("warm up", 4))  # the first call pays for connection set-up
    points = [("rate", a.rate)] if a.rate else [("concurrency", c) for c in a.concurrency]
    rows = []
    for kind, value in points:
        n = a.num_requests or max(a.requests_per_concurrency * int(value), 4)
        prompts = make_prompts(n, a.input_len, a.output_len, a.dataset, a.seed + int(value), a.attention_every)
        progress = Progress(n, f"{label} {kind}={value}", enabled=not a.no_progress and sys.stderr.isatty())
        if kind == "rate":
            results, duration = run_poisson(call, prompts, float(value), a.seed, progress)
        else:
            results, duration = run_closed_loop(call, prompts, int(value), progress)
        row = {kind: value, **summarize(results, duration, slo_ttft=a.slo_ttft, slo_tpot=a.slo_tpot)}
        rows.append(row)
        print(
            f"{label} {kind}={value}: {row['output_tok_s']:.1f} tok/s, {row['request_throughput']:.2f} req/s, "
            f"TTFT p50/p99 {row['ttft_p50_ms'] or 0:.0f}/{row['ttft_p99_ms'] or 0:.0f} ms, "
            f"ITL p50/p99 {row['itl_p50_ms'] or 0:.0f}/{row['itl_p99_ms'] or 0:.0f} ms, failed {row['failed']}",
            flush=True,
        )
    report = {
        "label": label,
        "backend": a.backend,
        "target": a.target,
        "args": {k: str(v) for k, v in vars(a).items()},
        "results": rows,
    }
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))
    if a.png and not a.rate:
        plot(a.png, label, rows)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
