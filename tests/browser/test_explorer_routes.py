"""The explorer's server side: the page's files, the flag that turns it off, and the two routes it
reads besides generation (/v1/models/{id} and /tokenize). No browser needed."""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from attnserve.client import Client
from attnserve.server.api.openai import HttpDoor, create_app
from attnserve.server.api.serving import GenerationService
from attnserve.server.config import parse_config
from attnserve.server.metrics import Metrics
from tests.browser.web import http_json
from tests.server.server_process import ServerProcess

TOKEN = "explorer-s3cret"
PAGE_FILES = ("index.html", "app.js", "style.css")


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _routes(explorer: bool) -> tuple[set[tuple[str, str]], list[str]]:
    door = HttpDoor(service=GenerationService(Metrics()), is_serving=lambda: True, registry=CollectorRegistry())
    app = create_app(door, explorer=explorer)
    routes = {(r.path, ",".join(sorted(getattr(r, "methods", ())))) for r in app.routes}
    return routes, [m.cls.__name__ for m in app.user_middleware]


def test_the_page_adds_static_routes_and_nothing_on_the_path_of_a_request() -> None:
    """Requests without attention never pay for the page: it adds three GET routes of fixed files,
    no middleware, and leaves every other route as it was."""
    on, middleware_on = _routes(True)
    off, middleware_off = _routes(False)
    assert on - off == {("/", "GET"), ("/explorer/app.js", "GET"), ("/explorer/style.css", "GET")}
    assert off <= on and middleware_on == middleware_off


def test_the_page_ships_in_the_package_and_loads_nothing_from_elsewhere() -> None:
    files = resources.files("attnserve.server.api.explorer")
    for name in PAGE_FILES:
        text = files.joinpath(name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), f"{name} loads from afar"
    assert "package-data" in (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()


def test_the_flag_and_its_environment_fallback() -> None:
    assert parse_config([], environ={}).explorer is True
    assert parse_config(["--no-explorer"], environ={}).explorer is False
    assert parse_config([], environ={"ATTNSERVE_NO_EXPLORER": "1"}).explorer is False


def _tiny(tmp_path_factory: pytest.TempPathFactory, *extra: str) -> ServerProcess:
    folder = tmp_path_factory.mktemp("explorer-routes")
    args = ["--model", "dummy:tiny", "--dtype", "float32", "--kv-cache-memory", "64MiB", *extra]
    return ServerProcess(args).start(folder / "server.log")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(the page on, with a bearer token; the page off), both loading at once."""
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    on = _tiny(tmp_path_factory, "--auth-token-file", str(token_file))
    off = _tiny(tmp_path_factory, "--no-explorer")
    try:
        yield on.wait_serving(), off.wait_serving()
    finally:
        on.stop()
        off.stop()


@pytest.mark.slow
def test_the_page_is_served_at_the_root_and_the_flag_turns_it_off(servers: tuple[ServerProcess, ServerProcess]) -> None:
    on, off = servers
    status, headers, body = get(f"{on.http_url}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]  # no inline or remote script runs
    assert b'<script src="/explorer/app.js"' in body
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, body = get(f"{on.http_url}/explorer/{name}")
        assert status == 200 and headers["content-type"].startswith(kind) and body
    assert get(f"{on.http_url}/explorer/index.html")[0] == 404  # only the named files, nothing else
    assert get(f"{on.http_url}/explorer/../config.py")[0] == 404
    for path in ("/", "/explorer/app.js", "/explorer/style.css"):
        assert get(f"{off.http_url}{path}")[0] == 404, path
    assert http_json(f"{off.http_url}/v1/models")[0] == 200  # the API stays on


@pytest.mark.slow
def test_model_card_gives_the_shape_get_model_info_gives(servers: tuple[ServerProcess, ServerProcess]) -> None:
    on, _ = servers
    with Client(on.target, token=TOKEN, timeout=30) as client:
        info = client.model_info()
    url = f"{on.http_url}/v1/models/{urllib.parse.quote(info.name)}"
    assert http_json(url)[0] == 401  # under /v1/: the bearer token is asked for
    status, card = http_json(url, token=TOKEN)
    assert status == 200, card
    assert (card["id"], card["object"], card["num_layers"], card["num_heads"], card["context_length"]) == (
        info.name,
        "model",
        info.num_layers,
        info.num_heads,
        info.context_length,
    )
    assert card["layer_windows"] == list(info.layer_windows) == [0] * info.num_layers  # no windows: the whole context
    status, error = http_json(f"{on.http_url}/v1/models/not-this-one", token=TOKEN)
    assert status == 404 and error["error"]["code"] == "model_not_found"


@pytest.mark.slow
def test_tokenize_gives_what_grpc_tokenize_gives(servers: tuple[ServerProcess, ServerProcess]) -> None:
    on, _ = servers
    url = f"{on.http_url}/tokenize"
    messages = [{"role": "user", "content": "Hello there"}]
    with Client(on.target, token=TOKEN, timeout=30) as client:
        plain = client.tokenize("Hello there")
        chat = client.tokenize(messages=[("user", "Hello there")])
    assert http_json(url, {"prompt": "Hello there"})[0] == 401  # the token holds outside /v1/ too
    for body, want in (({"prompt": "Hello there"}, plain), ({"messages": messages}, chat)):
        status, got = http_json(url, body, token=TOKEN)
        assert status == 200, got
        assert (got["token_ids"], got["tokens"], got["count"]) == (
            list(want.token_ids),
            list(want.tokens),
            len(want.token_ids),
        )
    for bad in ({}, {"prompt": "a", "messages": messages}, {"prompt": 3}, {"prompt": "a", "extra": 1}):
        status, error = http_json(url, bad, token=TOKEN)
        assert status == 400 and error["error"]["message"], (bad, error)
    status, error = http_json(url, {"messages": [{"role": "wizard", "content": "hi"}]}, token=TOKEN)
    assert status == 400 and "role" in error["error"]["message"], error
