"""The attention explorer in a real headless Chromium against a real server on the default model.

The page's requests are read off the network independently of the page: the weights the server
sent are decoded here, and the heatmap's pixels must be their colours on the page's scale.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.browser.web import http_json
from tests.server.server_process import ServerProcess

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm_server(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[ServerProcess]:
    """Started before the browser launches (the model loads meanwhile); the test waits for SERVING."""
    log = tmp_path_factory.mktemp("explorer") / "server.log"
    server = ServerProcess(["--model", str(default_gguf), "--dtype", "float32", "--kv-cache-memory", "256MiB"])
    server.start(log)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------ what the server sent
def sse_choices(body: bytes) -> list[dict[str, Any]]:
    choices = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choices += chunk["choices"]
    return choices


def decoded_rows(choices: list[dict[str, Any]]) -> tuple[dict[int, np.ndarray], int]:
    """Rows of one layer by query position, each (num_heads, context_len) float64; and their bytes."""
    rows, num_bytes = {}, 0
    for choice in choices:
        for row in choice.get("attention") or ():
            raw = base64.b64decode(row["weights"])
            num_bytes += len(raw)
            dtype = "<f4" if row["dtype"] == "float32" else "<f2"
            rows[row["position"]] = np.frombuffer(raw, dtype=dtype).astype(np.float64).reshape(row["num_heads"], -1)
    return rows, num_bytes


def expected_matrix(rows: dict[int, np.ndarray], head: str | int) -> np.ndarray:
    """(n, n) query x key weights for a head (mean, max or index); NaN where the key is in the future."""
    n = len(rows)
    out = np.full((n, n), np.nan)
    for q in range(n):
        heads = rows[q]
        out[q, : heads.shape[1]] = heads[head] if isinstance(head, int) else getattr(heads, head)(axis=0)
    return out


def expected_colours(matrix: np.ndarray, palette: dict[str, Any], *, hide_sink: bool, log: bool) -> list[list[Any]]:
    """Each cell's colour on the page's scale: a palette index (a rounding step either way allowed),
    or the fixed colour of a future key or of the hidden sink column."""
    visible = matrix[:, 1:] if hide_sink else matrix
    vmax = float(np.nanmax(visible)) if np.isfinite(visible).any() else 1.0
    vmax = vmax or 1.0
    cells: list[list[Any]] = []
    for q, row in enumerate(matrix):
        cells.append([])
        for k, v in enumerate(row):
            if math.isnan(v):
                cells[q].append(tuple(palette["future"]))
            elif hide_sink and k == 0:
                cells[q].append(tuple(palette["sink"]))
            else:
                x = (math.log10(max(v, 1e-30)) - math.log10(vmax)) / palette["decades"] + 1 if log else v / vmax
                cells[q].append(round(min(1.0, max(0.0, x)) * 255))
    return cells


# ------------------------------------------------------------------ what the page drew
CELL_COLOURS = """() => {
  const c = document.getElementById("heatmap");
  const n = Number(c.dataset.rows), cell = Number(c.dataset.cell);
  const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const out = [];
  for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
    const i = ((q * cell + (cell >> 1)) * c.width + k * cell + (cell >> 1)) * 4;
    out.push([data[i], data[i + 1], data[i + 2]]);
  }
  return out;
}"""


def assert_heatmap_shows(
    page: Any, rows: dict[int, np.ndarray], *, head: str | int, hide_sink: bool, log: bool
) -> None:
    n = len(rows)
    canvas = page.eval_on_selector("#heatmap", "c => ({...c.dataset, width: c.width, height: c.height})")
    assert (int(canvas["rows"]), int(canvas["cols"])) == (n, n), canvas
    assert canvas["width"] == canvas["height"] == n * int(canvas["cell"]), canvas
    assert canvas["head"] == str(head)
    palette = page.evaluate("explorer.palette")
    lut = [tuple(c) for c in palette["lut"]]
    drawn = page.evaluate(CELL_COLOURS)
    wanted = expected_colours(expected_matrix(rows, head), palette, hide_sink=hide_sink, log=log)
    bad = []
    for q in range(n):
        for k in range(n):
            got, want = tuple(drawn[q * n + k]), wanted[q][k]
            choices = [want] if isinstance(want, tuple) else lut[max(0, want - 1) : want + 2]
            if got not in choices:
                bad.append((q, k, got, want))
    assert not bad, f"{len(bad)} of {n * n} cells off the server's weights, e.g. {bad[:5]}"
    assert len({tuple(c) for c in drawn}) > 20, "the heatmap is (nearly) blank"


def wait_done(page: Any) -> None:
    # Selectors, not wait_for_function: the page's Content-Security-Policy forbids the eval() that needs.
    page.wait_for_selector("body[data-state=done], body[data-state=error]", state="attached", timeout=90_000)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#status")


# ------------------------------------------------------------------ the test
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.xdist_group("smollm")
def test_explorer_draws_the_weights_the_server_sent(smollm_server: ServerProcess, browser: Any, tmp_path: Path) -> None:
    server = smollm_server.wait_serving(timeout=180)
    name = http_json(f"{server.http_url}/v1/models")[1]["data"][0]["id"]
    card = http_json(f"{server.http_url}/v1/models/{urllib.parse.quote(name)}")[1]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.http_url}/")
    page.wait_for_selector("body[data-state=idle]")
    assert str(card["num_layers"]) in page.inner_text("#model-line")

    # Generate: the page asks for the one layer it shows, every head of it.
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "12")
    page.fill("#temperature", "0")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions"), timeout=90_000) as sent:
        page.click("#send")
    wait_done(page)
    last = card["num_layers"] - 1
    assert sent.value.request.post_data_json["attention"] == {
        "layers": [last],
        "head_reduction": "none",
        "include_prompt": True,
        "dtype": "float16",
    }
    choices = sse_choices(sent.value.body())
    rows, streamed_bytes = decoded_rows(choices)
    prompt = http_json(f"{server.http_url}/tokenize", {"messages": [{"role": "user", "content": PROMPT}]})[1]
    generated = [e["token"] for c in choices for e in ((c.get("logprobs") or {}).get("content") or ())]
    num_tokens = prompt["count"] + len(generated)
    assert "Paris" in "".join(generated) and page.evaluate("explorer.tokens.length") == num_tokens
    assert sorted(rows) == list(range(num_tokens - 1)), "a row for every token but the last"
    assert_heatmap_shows(page, rows, head="mean", hide_sink=True, log=False)
    _check_token_shading(page, rows, prompt["count"] + 2)

    # Another head, on a log scale: drawn from the same weights, nothing asked of the server.
    page.select_option("#head", "2")
    page.check("#log-scale")
    page.wait_for_selector("#heatmap[data-head='2']", state="attached")
    assert_heatmap_shows(page, rows, head=2, hide_sink=True, log=True)

    # Another layer: the page replays the sequence for that layer only.
    page.uncheck("#hide-sink")
    with page.expect_response(lambda r: r.url.endswith("/v1/completions"), timeout=90_000) as replay:
        page.select_option("#layer", "0")
    wait_done(page)
    asked = replay.value.request.post_data_json
    assert asked["attention"]["layers"] == [0] and asked["max_tokens"] == 1
    assert asked["prompt"][: prompt["count"]] == prompt["token_ids"] and len(asked["prompt"]) == num_tokens - 1
    layer0, replay_bytes = decoded_rows(sse_choices(replay.value.body()))
    assert sorted(layer0) == list(range(num_tokens - 1))
    page.wait_for_selector("#heatmap[data-layer='0']", state="attached")
    assert_heatmap_shows(page, layer0, head=2, hide_sink=False, log=True)
    _check_replay_matches_stream(server.http_url, asked["prompt"], last, rows)

    assert int(page.get_attribute("#bytes", "data-bytes") or 0) == streamed_bytes + replay_bytes
    assert f"{streamed_bytes + replay_bytes:,} bytes" in page.inner_text("#bytes")
    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("ATTNSERVE_SCREENSHOT_DIR"):  # refreshes the README's pictures
        shutil.copy(shot, Path(os.environ["ATTNSERVE_SCREENSHOT_DIR"]) / "explorer.png")
    assert not errors, errors


def _check_token_shading(page: Any, rows: dict[int, np.ndarray], position: int) -> None:
    """Hovering a token shades the tokens it attended to (its row), the strongest most."""
    page.hover(f"#tokens > span:nth-child({position + 1})")
    page.wait_for_selector(f"#tokens > span:nth-child({position + 1})[data-weight]", state="attached")
    weights = page.eval_on_selector_all("#tokens > span", "spans => spans.map(s => s.dataset.weight ?? null)")
    assert [i for i, w in enumerate(weights) if w is not None] == list(range(position + 1)), "no later token shaded"
    shown = np.array([float(w) for w in weights[: position + 1]])
    assert np.allclose(shown, rows[position].mean(axis=0), atol=1e-6), "the shading is the hovered token's row"
    backgrounds = page.eval_on_selector_all("#tokens > span", "spans => spans.map(s => s.style.background)")
    strongest = 1 + int(np.argmax(shown[1:]))  # the sink is left out of the shading's scale, as of the heatmap's
    assert "0.9)" in backgrounds[strongest], backgrounds[strongest]
    page.mouse.move(0, 0)


def _check_replay_matches_stream(url: str, ids: list[int], layer: int, streamed: dict[int, np.ndarray]) -> None:
    """The replay the page uses for another layer computes the same weights as the generation did."""
    attention = {"layers": [layer], "head_reduction": "none", "include_prompt": True}
    status, reply = http_json(f"{url}/v1/completions", {"prompt": ids, "max_tokens": 1, "attention": attention})
    assert status == 200, reply
    replayed, _ = decoded_rows(reply["choices"])
    assert sorted(replayed) == sorted(streamed)
    worst = max(float(np.abs(replayed[q] - streamed[q]).max()) for q in streamed)
    assert worst < 2e-3, worst
