"""Soak: mixed load for a long time, with the server's RSS sampled throughout.

    python bench/soak.py --minutes 60 [--model PATH] [--clients 8]      # make soak

Clients run closed loops of random requests: a quarter ask for attention (random layers, head
reduction and prompt rows), some read their streams slowly, some never read and hang up later,
some cancel early. Every 10 s: the server's RSS, running/waiting/paused requests, KV usage and
reserved attention memory. At the end: the RSS curve, its ceiling against the configured budget
(RSS after warm-up + attention memory budget), and whether KV and buffers came back to zero.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attnserve.client import AttnserveError, Client  # noqa: E402
from attnserve.model.fetch import default_model_path  # noqa: E402
from tests.server.server_process import ServerProcess  # noqa: E402

WORDS = ["the", "model", "attends", "to", "every", "token", "before", "it", "predicts", "what", "comes", "next"]


def one_request(client: Client, rng: random.Random, outcomes: Counter[str]) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400)))
    ask: dict[str, object] = dict(max_tokens=rng.randint(8, 128), ignore_eos=True, temperature=rng.choice([0.0, 0.8]))
    if rng.random() < 0.25:
        ask.update(
            attention_layers=rng.sample(range(30), rng.randint(1, 30)),
            head_reduction=rng.choice(["mean", "max", "none"]),
            include_prompt=rng.random() < 0.3,
        )
    style = rng.choices(["read", "slow", "never", "cancel"], weights=[80, 10, 5, 5])[0]
    try:
        stream = client.generate_stream(prompt, **ask)
        for i, _ in enumerate(stream):
            if style == "slow":
                time.sleep(0.2)
            elif style == "never":
                time.sleep(rng.uniform(10, 90))  # hold the stream unread, then hang up
                break
            elif style == "cancel" and i == 3:
                break
        stream.close()
        outcomes[style] += 1
    except AttnserveError as exc:
        outcomes[exc.code.name] += 1


def five_minute_table(curve: list[tuple[float, float]]) -> str:
    """The curve as a two-row table: the last sample up to every fifth minute (the README's form)."""
    marks: dict[int, float] = {}
    for minute, rss in curve:
        marks[5 * math.ceil(minute / 5)] = rss
    heads = " | ".join(str(m) for m in marks)
    values = " | ".join(f"{r:.0f}" for r in marks.values())
    return f"| minute | {heads} |\n|---|{'---|' * len(marks)}\n| RSS MB | {values} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--attention-memory-budget", default="512MiB")
    args = p.parse_args()
    server = ServerProcess(
        ["--model", args.model, "--dtype", "float32", "--attention-memory-budget", args.attention_memory_budget]
    )
    server.start(Path("/tmp/attnserve-soak.log")).wait_serving(300)
    end = time.monotonic() + args.minutes * 60
    outcomes: Counter[str] = Counter()
    baseline = server.rss_mb()

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with Client(server.target, timeout=300) as client:
            while time.monotonic() < end:
                one_request(client, rng, outcomes)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    print(f"RSS after warm-up {baseline:.0f} MB; budget {args.attention_memory_budget} of attention memory on top")
    print("| minute | RSS MB | running | waiting | paused | KV usage | attention reserved MB |")
    print("|---|---|---|---|---|---|---|")
    curve: list[tuple[float, float]] = []  # (minute, RSS MB)
    started = time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(10)
        rss, minute = server.rss_mb(), (time.monotonic() - started) / 60
        curve.append((minute, rss))
        m = server.metric
        print(
            f"| {minute:.1f} | {rss:.0f} | {m('attnserve_num_requests_running'):.0f} | "
            f"{m('attnserve_num_requests_waiting'):.0f} | {m('attnserve_num_requests_paused'):.0f} | "
            f"{m('attnserve_kv_cache_usage_perc'):.2f} | {m('attnserve_attention_memory_reserved_bytes') / 1e6:.1f} |",
            flush=True,
        )
    time.sleep(2)
    m = server.metric
    print(f"\noutcomes: {dict(outcomes)}")
    rss = [r for _, r in curve]
    print(f"RSS: warm-up {baseline:.0f} MB, max {max(rss):.0f} MB, last {rss[-1]:.0f} MB")
    print(five_minute_table(curve))
    print(
        f"at the end: running {m('attnserve_num_requests_running'):.0f}, "
        f"KV usage {m('attnserve_kv_cache_usage_perc')}, "
        f"attention reserved {m('attnserve_attention_memory_reserved_bytes'):.0f} B, "
        f"backlog {m('attnserve_stream_backlog_bytes'):.0f} B"
    )
    server.stop()


if __name__ == "__main__":
    main()
