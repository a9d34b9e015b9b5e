"""Headless Chromium (Debian's package, driven by Playwright) for the explorer page's tests.

`make test` installs both first (`make browser-deps`); a run without them skips these tests and
says why, rather than failing on a machine that cannot install a browser.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("ATTNSERVE_CHROMIUM", "/usr/bin/chromium"))
APT_LOG = REPO / ".venv" / "apt-chromium.log"  # written by `make browser-deps` when apt-get fails
# What a headless browser on a CI machine without a display or a network needs.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        why = f" (apt-get said: {APT_LOG.read_text()[-300:].strip()})" if APT_LOG.exists() else ""
        return f"{CHROMIUM} is missing and `make browser-deps` (run by `make test`) could not install it{why}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: `make browser-deps` (run by `make test`) installs it"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
