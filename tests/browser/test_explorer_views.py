"""The explorer's logit-lens grid, its two-run comparison and its top-k attention rows, in a real
headless Chromium against a real server on the tiny random model.

What the server sent is read off the network independently of the page, and what the page shows
must be it: every lens cell the server's top token of that layer and position (the last layer's
the generated tokens), the first position where two runs' tokens differ marked (and none marked
when they agree), top-k rows drawn as the kept positions only.
"""

from __future__ import annotations

import base64
import json
import math
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.browser.web import http_json
from tests.server.server_process import ServerProcess

PROMPT = "The quick brown fox jumps over the lazy dog"
COMPLETIONS = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Started before the browser launches (the model loads meanwhile); tests wait for SERVING."""
    log = tmp_path_factory.mktemp("explorer-views") / "server.log"
    server = ServerProcess(["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "64MiB"])
    server.start(log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def card(tiny_server: ServerProcess) -> dict[str, Any]:
    url = tiny_server.wait_serving(timeout=180).http_url
    name = http_json(f"{url}/v1/models")[1]["data"][0]["id"]
    return http_json(f"{url}/v1/models/{urllib.parse.quote(name)}")[1]


@pytest.fixture
def page(tiny_server: ServerProcess, card: dict[str, Any], browser: Any) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{tiny_server.http_url}/")
    page.wait_for_selector("body[data-state=idle]")
    yield page
    page.close()
    assert not errors, errors


def save_screenshot(page: Any, selector: str, tmp_path: Path, name: str) -> None:
    """The view renders to a picture (the README's are of the default model: bench/explorer_screenshots.py)."""
    shot = tmp_path / name
    page.locator(selector).screenshot(path=str(shot))
    assert shot.stat().st_size > 5_000


def wait_section(page: Any, section: str) -> None:
    # Selectors, not wait_for_function: the page's Content-Security-Policy forbids the eval() that needs.
    page.wait_for_selector(
        f"#{section}[data-state=done], #{section}[data-state=error]", state="attached", timeout=90_000
    )
    status = page.inner_text(f"#{section}-status")
    assert page.get_attribute(f"#{section}", "data-state") == "done", status


def generation_exchanges(page: Any, action: Any) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request body, response body) of every completion the page sent while action() ran."""
    responses: list[Any] = []
    listener = lambda r: responses.append(r) if r.url.endswith(COMPLETIONS) else None  # noqa: E731
    page.on("response", listener)
    try:
        action()
    finally:
        page.remove_listener("response", listener)
    return [(r.request.post_data_json, r.json()) for r in responses]


# ------------------------------------------------------------------ logit lens
@pytest.mark.slow
def test_logit_lens_grid_is_layers_by_tokens_and_its_last_layer_is_the_output(
    page: Any, card: dict[str, Any], tmp_path: Path
) -> None:
    num_layers = card["num_layers"]
    page.fill("#prompt", PROMPT)  # chat mode: the page's default
    page.fill("#max-tokens", "7")
    page.fill("#lens-top-k", "4")

    def run() -> None:
        page.click("#lens-run")
        wait_section(page, "lens")

    [(asked, reply)] = generation_exchanges(page, run)
    assert asked["logit_lens"] == {"layers": list(range(num_layers)), "top_k": 4}, "one request, every layer"
    assert asked["temperature"] == 0 and asked["return_token_ids"] is True
    choice = reply["choices"][0]
    generated = choice["token_ids"]
    prompt_len = reply["usage"]["prompt_tokens"]
    assert len(generated) == 7
    lens = {(r["layer"], r["position"]): r for r in choice["logit_lens"]}

    # The grid: one row per layer (the last on top), one column per generated token.
    assert page.get_attribute("#lens-grid", "data-layers") == str(num_layers)
    assert page.get_attribute("#lens-grid", "data-cols") == str(len(generated))
    header = page.eval_on_selector_all(
        "#lens-grid thead th[data-col]", "ths => ths.map(t => Number(t.dataset.tokenId))"
    )
    assert header == generated
    cells = page.eval_on_selector_all(
        "#lens-grid td.lens-cell",
        """tds => tds.map(t => ({layer: Number(t.dataset.layer), col: Number(t.dataset.col),
            position: Number(t.dataset.position), id: Number(t.dataset.tokenId), token: t.dataset.token,
            prob: Number(t.dataset.prob), match: t.classList.contains("match"), title: t.title,
            background: t.style.background}))""",
    )
    assert len(cells) == num_layers * len(generated)
    rows_order = [c["layer"] for c in cells[:: len(generated)]]
    assert rows_order == list(reversed(range(num_layers)))
    for c in cells:
        r = lens[(c["layer"], c["position"])]
        assert c["position"] == prompt_len - 1 + c["col"]
        assert (c["id"], c["token"]) == (r["token_ids"][0], r["tokens"][0]), c
        assert math.isclose(c["prob"], r["probs"][0], rel_tol=1e-6)
        alpha = float(c["background"].rstrip(")").split(",")[-1])
        assert math.isclose(alpha, 0.08 + 0.85 * r["probs"][0], abs_tol=0.005), (
            "shaded by its probability (8-bit alpha)"
        )
        assert len(c["title"].splitlines()) == 1 + 4, "the tooltip lists the top-k"
        assert c["match"] == (r["token_ids"][0] == generated[c["col"]])
    last = [c["id"] for c in cells if c["layer"] == num_layers - 1]
    assert last == generated, "the last layer's lens is the model's own greedy choice"

    # Keyboard: one tab stop, arrows move through the grid and the line below tells the cell.
    page.focus("#lens-grid td.lens-cell[tabindex='0']")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowRight")
    focused = page.evaluate("({layer: document.activeElement.dataset.layer, col: document.activeElement.dataset.col})")
    assert focused == {"layer": str(num_layers - 2), "col": "1"}
    assert f"layer {num_layers - 2}, position {prompt_len}" in page.inner_text("#lens-cell")
    save_screenshot(page, "#lens", tmp_path, "explorer-logit-lens.png")


# ------------------------------------------------------------------ two runs
def run_both(page: Any) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], Any]:
    def run() -> None:
        page.click("#compare-run")
        wait_section(page, "compare")

    exchanges = generation_exchanges(page, run)
    assert len(exchanges) == 2, [asked.keys() for asked, _ in exchanges]
    return exchanges, page


def marked(page: Any, run: str) -> tuple[list[int], list[int]]:
    """(generated indices marked as the first divergence, generated indices marked as after it)."""
    spans = page.eval_on_selector_all(
        f"#{run} .run-tokens span[data-gen]",
        "ss => ss.map(s => [Number(s.dataset.gen), ...['divergence', 'diverged'].map(c => s.classList.contains(c))])",
    )
    return [g for g, first, _ in spans if first], [g for g, _, after in spans if after]


@pytest.mark.slow
@pytest.mark.parametrize("intervention", ["steer", "ablate"])
def test_two_runs_mark_where_steered_or_ablated_tokens_part(
    page: Any, card: dict[str, Any], tmp_path: Path, intervention: str
) -> None:
    page.check("input[name=mode][value=prompt]")
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "10")
    if intervention == "steer":
        page.check("#steer-on")
        page.select_option("#steer-layer", "0")
        page.fill("#steer-scale", "40")
        # Only generated positions: the first token is read off the prompt's last row, unsteered,
        # so the runs agree on it and part later (the mark is not simply at 0).
        page.select_option("#steer-positions", "generated")
    else:
        page.fill("#ablate", "0:0,2; 1:1")
    page.select_option("#compare-layer", str(card["num_layers"] - 1))
    exchanges, _ = run_both(page)

    key = "steering" if intervention == "steer" else "ablations"
    plain = [(a, r) for a, r in exchanges if key not in a]
    changed = [(a, r) for a, r in exchanges if key in a]
    assert len(plain) == len(changed) == 1
    (asked_a, reply_a), (asked_b, reply_b) = plain[0], changed[0]
    assert "steering" not in asked_a and "ablations" not in asked_a
    assert asked_a["temperature"] == asked_b["temperature"] == 0
    if intervention == "steer":
        [steer] = asked_b["steering"]
        where = (steer["layer"], steer["point"], steer["positions"], steer["scale"])
        assert where == (0, "resid_post", "generated", 40)
        assert len(steer["vector"]) == card["hidden_size"]
        assert math.isclose(float(np.linalg.norm(steer["vector"])), 1, rel_tol=1e-6), "a unit direction"
    else:
        assert asked_b["ablations"] == [
            {"layer": 0, "heads": [0, 2], "scale": 0},
            {"layer": 1, "heads": [1], "scale": 0},
        ]

    ids_a, ids_b = reply_a["choices"][0]["token_ids"], reply_b["choices"][0]["token_ids"]
    assert ids_a != ids_b, f"the {intervention} changes the tiny model's greedy tokens"
    first = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y), min(len(ids_a), len(ids_b)))
    if intervention == "steer":
        assert first >= 1, "the first token comes from the prompt's last row, which was not steered"
    assert page.get_attribute("#compare", "data-divergence") == str(first)
    for run, ids in (("run-a", ids_a), ("run-b", ids_b)):
        firsts, after = marked(page, run)
        assert firsts == ([first] if first < len(ids) else []), run
        assert after == list(range(first, len(ids))), run
    assert f"part at generated token {first}" in page.inner_text("#compare-summary")

    # Each run's attention: one row per token but the last, the prompt's included.
    prompt_len = reply_a["usage"]["prompt_tokens"]
    for run, ids in (("run-a", ids_a), ("run-b", ids_b)):
        assert page.get_attribute(f"#{run} .run-map", "data-rows") == str(prompt_len + len(ids) - 1)
    page.hover(f"#run-b .run-tokens span:nth-child({prompt_len + 1})")
    page.wait_for_selector(f"#run-b .run-tokens span:nth-child({prompt_len + 1}).focus", state="attached")
    weights = page.eval_on_selector_all("#run-b .run-tokens span", "ss => ss.map(s => s.dataset.weight ?? null)")
    assert [i for i, w in enumerate(weights) if w is not None] == list(range(prompt_len + 1)), "its row, causal"
    if intervention == "steer":
        save_screenshot(page, "#compare", tmp_path, "explorer-two-runs.png")


@pytest.mark.slow
def test_two_plain_runs_show_no_divergence(page: Any) -> None:
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "8")
    exchanges, _ = run_both(page)
    (asked_a, reply_a), (asked_b, reply_b) = exchanges
    assert asked_a == asked_b and "steering" not in asked_a and "ablations" not in asked_a
    assert reply_a["choices"][0]["token_ids"] == reply_b["choices"][0]["token_ids"]
    assert page.get_attribute("#compare", "data-divergence") == "none"
    assert page.eval_on_selector_all("#compare .divergence, #compare .diverged", "ss => ss.length") == 0
    assert "identical" in page.inner_text("#compare-summary")


@pytest.mark.slow
def test_two_runs_name_a_bad_ablation_before_sending(page: Any) -> None:
    page.fill("#prompt", PROMPT)
    page.fill("#ablate", "0:99")

    def run() -> None:
        page.click("#compare-run")
        page.wait_for_selector("#compare[data-state=error]", state="attached")

    exchanges = generation_exchanges(page, run)
    assert exchanges == []
    assert "head 99" in page.inner_text("#compare-status")


# ------------------------------------------------------------------ top-k attention
def sse_choices(body: bytes) -> list[dict[str, Any]]:
    choices = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choices += json.loads(line[6:])["choices"]
    return choices


@pytest.mark.slow
def test_top_k_rows_draw_the_kept_positions_only(page: Any) -> None:
    k = 3
    page.check("input[name=mode][value=prompt]")
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "6")
    page.fill("#attn-top-k", str(k))
    page.uncheck("#hide-sink")
    with page.expect_response(lambda r: r.url.endswith("/v1/completions"), timeout=90_000) as sent:
        page.click("#send")
    page.wait_for_selector("body[data-state=done], body[data-state=error]", state="attached", timeout=90_000)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#status")
    assert sent.value.request.post_data_json["attention"]["top_k"] == k

    # The server's rows, densified here: the mean over heads, NaN where no head kept the key.
    dense: dict[int, np.ndarray] = {}
    num_bytes = 0
    for choice in sse_choices(sent.value.body()):
        for row in choice.get("attention") or ():
            kept, heads, ctx = row["num_kept"], row["num_heads"], row["context_len"]
            assert kept == min(k, ctx)
            raw_w, raw_p = base64.b64decode(row["weights"]), base64.b64decode(row["positions"])
            num_bytes += len(raw_w) + len(raw_p)
            assert len(raw_w) + len(raw_p) == heads * kept * (2 + 4), "O(k) per row, not O(context)"
            w = np.frombuffer(raw_w, "<f2").astype(np.float64).reshape(heads, kept)
            pos = np.frombuffer(raw_p, "<i4").reshape(heads, kept)
            out = np.zeros(ctx)
            seen = np.zeros(ctx, bool)
            for h in range(heads):
                out[pos[h]] += w[h]
                seen[pos[h]] = True
            assert seen.sum() <= heads * kept
            dense[row["position"]] = np.where(seen, out / heads, np.nan)
    n = len(dense)
    assert sorted(dense) == list(range(n)) and n > 2 * k
    assert int(page.get_attribute("#bytes", "data-bytes") or 0) == num_bytes, "weights and positions counted"

    palette = page.evaluate("explorer.palette")
    lut = [tuple(c) for c in palette["lut"]]
    drawn = page.evaluate(
        """() => {
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
    )
    assert len(drawn) == n * n
    vmax = max(float(np.nanmax(r[:n])) for r in dense.values())
    bad = []
    for q in range(n):
        for key in range(n):
            got = tuple(drawn[q * n + key])
            if key > q:
                want = [tuple(palette["future"])]
            elif math.isnan(dense[q][key]):
                want = [tuple(palette["notKept"])]
            else:
                x = round(min(1.0, dense[q][key] / vmax) * 255)
                want = lut[max(0, x - 1) : x + 2]
            if got not in want:
                bad.append((q, key, got))
    assert not bad, f"{len(bad)} of {n * n} cells off the server's top-k rows, e.g. {bad[:5]}"
    assert sum(c == list(palette["notKept"]) for c in drawn) > n, "the rows are sparse on the page too"


@pytest.mark.slow
def test_a_long_prompt_with_top_k_stays_light(page: Any, card: dict[str, Any]) -> None:
    """~900 prompt rows: top-4 rows cost heads x 4 x 6 bytes each, against heads x context x 2 whole."""
    k, max_tokens = 4, 4
    page.check("input[name=mode][value=prompt]")
    page.fill("#prompt", " ".join([PROMPT] * 20))
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#attn-top-k", str(k))
    with page.expect_response(lambda r: r.url.endswith("/v1/completions"), timeout=90_000) as sent:
        page.click("#send")
    page.wait_for_selector("body[data-state=done], body[data-state=error]", state="attached", timeout=90_000)
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#status")
    rows = [row for c in sse_choices(sent.value.body()) for row in c.get("attention") or ()]
    n = len(rows)
    assert n > 800 and page.get_attribute("#heatmap", "data-rows") == str(n)
    heads = card["num_heads"]
    kept_bytes = sum(heads * min(k, r["context_len"]) * 6 for r in rows)
    whole_bytes = sum(heads * r["context_len"] * 2 for r in rows)
    assert int(page.get_attribute("#bytes", "data-bytes") or 0) == kept_bytes
    assert kept_bytes * 30 < whole_bytes, (kept_bytes, whole_bytes)  # ~36x lighter here (mean context ~430)
    assert "top-4 per head row" in page.inner_text("#bytes")
