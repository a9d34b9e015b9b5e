"""The README's pictures of the explorer's logit-lens and two-run views, on the default model.

    python bench/explorer_screenshots.py [--model PATH] [--out docs/explorer]

Starts a server (float32), opens the page in headless Chromium (`make browser-deps`), runs the
logit lens of a chat prompt and two greedy runs of it (plain, and steered along a seeded random
direction plus two heads zeroed), and saves `explorer-logit-lens.png` and `explorer-two-runs.png`.
The browser tests (tests/browser/test_explorer_views.py) check the same views on the tiny model;
this script only takes pictures of a model whose tokens read as words.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attnserve.model.fetch import default_model_path  # noqa: E402
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.server.server_process import ServerProcess  # noqa: E402

PROMPT = "What is the capital of France?"


def wait(page: object, section: str) -> None:
    page.wait_for_selector(  # type: ignore[attr-defined]
        f"#{section}[data-state=done], #{section}[data-state=error]", state="attached", timeout=300_000
    )
    state = page.get_attribute(f"#{section}", "data-state")  # type: ignore[attr-defined]
    if state != "done":
        raise RuntimeError(page.inner_text(f"#{section}-status"))  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(default_model_path()))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "explorer")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ablate", default="", help='run B: heads to zero, "layer:head,head; ..."')
    parser.add_argument("--steer-layer", type=int, default=6)
    parser.add_argument("--steer-scale", type=float, default=90.0)
    parser.add_argument("--steer-seed", type=int, default=1)
    parser.add_argument("--steer-positions", default="generated", choices=["all", "prompt", "generated"])
    parser.add_argument("--compare-layer", type=int, default=None)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    log = Path(tempfile.mkdtemp()) / "server.log"
    server = ServerProcess(["--model", args.model, "--dtype", "float32", "--kv-cache-memory", "256MiB"]).start(log)
    try:
        server.wait_serving(timeout=300)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
            page.goto(f"{server.http_url}/")
            page.wait_for_selector("body[data-state=idle]")
            page.fill("#prompt", args.prompt)
            page.fill("#max-tokens", str(args.max_tokens))

            page.click("#lens-run")
            wait(page, "lens")
            page.mouse.move(0, 0)
            page.focus("#lens-grid td.lens-cell[tabindex='0']")
            for key in ["ArrowDown"] * 3 + ["ArrowRight"] * 2:
                page.keyboard.press(key)
            page.locator("#lens").screenshot(path=str(args.out / "explorer-logit-lens.png"))

            if args.ablate:
                page.fill("#ablate", args.ablate)
            page.check("#steer-on")
            page.select_option("#steer-layer", str(args.steer_layer))
            page.fill("#steer-scale", str(args.steer_scale))
            page.fill("#steer-seed", str(args.steer_seed))
            page.select_option("#steer-positions", args.steer_positions)
            if args.compare_layer is not None:
                page.select_option("#compare-layer", str(args.compare_layer))
            page.click("#compare-run")
            wait(page, "compare")
            divergence = page.get_attribute("#compare", "data-divergence")
            page.hover("#run-b .run-tokens .divergence") if divergence != "none" else None
            page.locator("#compare").screenshot(path=str(args.out / "explorer-two-runs.png"))
            print(page.inner_text("#lens-status"))
            print(page.inner_text("#compare-summary"))
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
