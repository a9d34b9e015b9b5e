"""The attention explorer: a static page (index.html, app.js, style.css) served at / on the HTTP port.

The files ship inside the package and are read once, when the app is built; the page then talks
to the public routes only (/v1/models/{id}, /tokenize, /v1/chat/completions, /v1/completions), so
it adds nothing to the path of a request that does not ask for attention.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# The page loads only its own files and talks only to this server: no CDN, no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def add_explorer_routes(app: FastAPI) -> None:
    """GET / (the page) and GET /explorer/<asset>; files are held in memory (a few tens of kB)."""
    page = _read("index.html")
    assets = {name: (_read(name), media_type) for name, media_type in ASSETS.items()}

    @app.get("/", include_in_schema=False)
    async def explorer_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    # One route per file (no path parameter): nothing but these files can ever be served.
    for name, (body, media_type) in assets.items():
        app.add_api_route(f"/explorer/{name}", _asset(body, media_type), methods=["GET"], include_in_schema=False)


def _asset(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(body, media_type=f"{media_type}; charset=utf-8", headers=SECURITY_HEADERS)

    return serve
