"""Plain HTTP calls for the explorer's tests (the standard library: no client to install)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def http_json(url: str, body: dict[str, Any] | None = None, *, token: str | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a GET (no body) or a POST, whatever the status."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")
