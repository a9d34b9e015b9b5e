"""The hostile-input cases against a real server on the default model, with the server's RSS.

    python bench/hostile_rss.py [--model PATH] [--seconds 60]

Cases (from the hostile-input issue): attention for every layer, every head and every prompt
row of a 1,024-token prompt; all layers of a 4,096-token prompt; a stream with per-token
attention that is never read; a ~4 MB prompt while another client streams; and the look-inside
ones: residuals at every point of every layer for every row of a 4,096-token prompt, steering
vectors holding a NaN or 64 MB, the logit lens of every layer for every row of a long prompt. For each: the
status, how long it took, and the server's RSS before, at its peak during the case, and after.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attnserve.client import AttnserveError, Client, Steer  # noqa: E402
from attnserve.model.fetch import default_model_path  # noqa: E402
from tests.server.server_process import ServerProcess  # noqa: E402


class RssWatch:
    """Samples the server's RSS every 50 ms while a case runs."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.peak, self._stop = server, 0.0, threading.Event()

    def __enter__(self) -> RssWatch:
        self.before = self.server.rss_mb()
        self.peak = self.before
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.server.rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(0.5)
        self.after = self.server.rss_mb()


def outcome(call: Callable[[], object]) -> str:
    try:
        call()
        return "OK"
    except AttnserveError as exc:
        return f"{exc.code.name}: {exc.message[:150]}"


def cases(client: Client, target: str, seconds: float) -> dict[str, Callable[[], object]]:
    long_prompt = [100 + i % 4000 for i in range(1024)]
    longer_prompt = [100 + i % 4000 for i in range(4096)]

    def never_read() -> object:
        # ~47 MB of weights in all (4 layers, every head, 512 tokens over a 1,024-token prompt): under the
        # per-request cap, so it is admitted; the server must hold at most its backlog bound of it.
        stream = client.generate_stream(
            token_ids=long_prompt, max_tokens=512, ignore_eos=True, attention_layers=[0, 1, 2, 3], head_reduction="none"
        )
        next(stream)
        time.sleep(seconds)  # read nothing: the server must pause it, then end it
        return list(stream)

    def huge_prompt_while_streaming() -> object:
        gaps: list[float] = []

        def stream() -> None:
            with Client(target, timeout=300) as other:
                last = time.monotonic()
                for _ in other.generate_stream("Tell me a long story.", chat=True, max_tokens=64, ignore_eos=True):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(1.0)
        try:
            client.generate("All work and no play. " * 180_000, max_tokens=4)
        finally:
            t.join()
            print(f"    the other stream's longest gap between tokens: {max(gaps[1:], default=0):.2f}s")

    hidden = client.model_info().hidden_size
    every_point = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
    return {
        "residuals: every layer x every point x every row of a 4,096-token prompt": lambda: client.generate(
            token_ids=longer_prompt,
            max_tokens=512,
            residual_points=every_point,
            residual_layers=list(range(30)),
            inspect_prompt=True,
        ),
        "32 steering vectors, one holding a NaN": lambda: client.generate(
            "hi", max_tokens=4, steering=[Steer(0, [0.1] * (hidden - 1) + [float("nan")])] * 32
        ),
        "a 64 MB steering vector": lambda: client.generate("hi", max_tokens=4, steering=[Steer(0, [0.1] * (16 << 20))]),
        "logit lens, every layer, every row of a 1,024-token prompt, streamed": lambda: list(
            client.generate_stream(
                token_ids=long_prompt, max_tokens=64, logit_lens_layers=list(range(30)), inspect_prompt=True
            )
        ),
        "1,024-token prompt, 30 layers, no head reduction, prompt rows": lambda: client.generate(
            token_ids=long_prompt,
            max_tokens=16,
            attention_layers=list(range(30)),
            head_reduction="none",
            include_prompt=True,
        ),
        "4,096-token prompt, 30 layers (mean), no prompt rows": lambda: list(
            client.generate_stream(
                token_ids=longer_prompt, max_tokens=32, ignore_eos=True, attention_layers=list(range(30))
            )
        ),
        f"stream with per-token attention (4 layers, all heads), never read for {seconds:.0f}s": never_read,
        "~4 MB prompt while another client streams": huge_prompt_while_streaming,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--seconds", type=float, default=60.0, help="how long the never-reading client holds its stream")
    args = p.parse_args()
    server = ServerProcess(["--model", args.model, "--dtype", "float32", "--stalled-reader-timeout", "30"])
    server.start(Path("/tmp/attnserve-hostile.log")).wait_serving(300)
    print("| case | outcome | seconds | RSS before / peak / after (MB) |\n|---|---|---|---|")
    try:
        with Client(server.target, timeout=600) as client:
            for name, call in cases(client, server.target, args.seconds).items():
                with RssWatch(server) as watch:
                    start = time.monotonic()
                    result = outcome(call)
                    took = time.monotonic() - start
                print(f"| {name} | {result} | {took:.1f} | {watch.before:.0f} / {watch.peak:.0f} / {watch.after:.0f} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
