"""The CLI's HTTP mode: `generate` and `info` against attnserve's OpenAI-compatible door
(`--http http://host:8080`, or a `--target` that starts with http:// or https://).

Only the standard library: urllib for the calls, server-sent events parsed here for --stream.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnserve.client.client import AttnserveError

TIMEOUT_HEADER = "x-request-timeout"  # the server's deadline for the request, seconds (504 past it)


class HttpError(AttnserveError):
    """A refusal from the HTTP door: its status and the message of its OpenAI-shaped error body
    (status 0: none, the server could not be reached or the error came inside a stream)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status else self.message


def http_url(args: argparse.Namespace) -> str | None:
    """The HTTP base URL the command asked for, or None for gRPC."""
    url = getattr(args, "http", None)
    if url is None and str(args.target).startswith(("http://", "https://")):
        url = args.target
    return url.rstrip("/") if url else None


class HttpTarget:
    """One server's HTTP door: JSON calls and SSE streams, with the bearer token and deadline if given."""

    def __init__(self, base_url: str, *, token: str | None, timeout: float | None, ca: str | None) -> None:
        self.base_url, self.token, self.timeout = base_url, token, timeout
        self.context = ssl.create_default_context(cafile=ca) if ca else None

    def _open(self, path: str, body: dict[str, Any] | None) -> Any:
        headers = {"Accept": "application/json, text/event-stream"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.timeout:
            headers[TIMEOUT_HEADER] = str(self.timeout)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout or 600, context=self.context)
        except urllib.error.HTTPError as error:
            raise HttpError(error.code, _error_message(error.read())) from None
        except urllib.error.URLError as error:
            raise HttpError(0, f"cannot reach {self.base_url}: {error.reason}") from None

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._open(path, body) as reply:
            return json.loads(reply.read())

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON payload of each event until `data: [DONE]`; an error event raises HttpError."""
        with self._open(path, body) as reply:
            for data in sse_data(reply):
                if data == "[DONE]":
                    return
                payload = json.loads(data)
                if "error" in payload:
                    raise HttpError(0, f"the stream ended with an error: {_error_message(data.encode())}")
                yield payload

    def health(self) -> str:
        try:
            with self._open("/health", None):
                return "SERVING"
        except HttpError as error:
            if error.status == 0:
                raise
            return "NOT_SERVING"


def sse_data(lines: Any) -> Iterator[str]:
    """The data of each server-sent event (its `data:` lines joined), from an iterable of byte lines."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:  # a blank line ends the event
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _error_message(raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return str(error.get("message") or error)
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:300]


# --------------------------------------------------------------------------- the CLI
def target_of(args: argparse.Namespace, url: str) -> HttpTarget:
    token = args.token
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    return HttpTarget(url, token=token, timeout=args.timeout, ca=args.ca)


def request_body(prompt: str, *, chat: bool, sampling: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI body; attnserve's extensions (top_k, min_p, repetition_penalty, ignore_eos) ride along."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    for key, value in sampling.items():
        if value is None or (key == "stop" and not value) or (key == "ignore_eos" and not value):
            continue
        body[key] = list(value) if key == "stop" else value
    return body


def cli_generate(args: argparse.Namespace, url: str, sampling: dict[str, Any]) -> int:
    if getattr(args, "attention_png", None):
        print("error: --attention-png needs the gRPC door (drop --http)", file=sys.stderr)
        return 2
    target = target_of(args, url)
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    body = request_body(args.prompt, chat=args.chat, sampling=sampling)
    start = time.perf_counter()
    if args.stream:
        usage, finishes, ttft = _print_stream(target, path, body, chat=args.chat)
    else:
        reply = target.call(path, body)
        choices = reply["choices"]
        for choice in choices:
            text = choice["message"]["content"] if args.chat else choice["text"]
            print(("" if len(choices) == 1 else f"[{choice['index']}] ") + (text or ""))
        usage, finishes, ttft = reply.get("usage") or {}, [c["finish_reason"] for c in choices], None
    if args.verbose:
        print(_summary(usage, finishes, ttft, time.perf_counter() - start), file=sys.stderr)
    return 0


def _print_stream(
    target: HttpTarget, path: str, body: dict[str, Any], *, chat: bool
) -> tuple[dict[str, Any], list[str], float | None]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft = time.perf_counter(), None
    usage: dict[str, Any] = {}
    finishes: list[str] = []
    for chunk in target.stream(path, body):
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            text = (choice.get("delta", {}).get("content") if chat else choice.get("text")) or ""
            if text and ttft is None:
                ttft = time.perf_counter() - start
            print(text, end="", flush=True)
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    print()
    return usage, finishes, ttft


def _summary(usage: dict[str, Any], finishes: list[str], ttft: float | None, total: float) -> str:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return (
        f"[{usage.get('completion_tokens', '?')} tokens, finish {', '.join(finishes)}, "
        f"ttft {'-' if ttft is None else f'{ttft:.3f}s'}, total {total:.3f}s, "
        f"{usage.get('prompt_tokens', '?')} prompt tokens ({cached} cached)]"
    )


def cli_info(args: argparse.Namespace, url: str) -> int:
    target = target_of(args, url)
    print(f"health: {target.health()}")
    for card in target.call("/v1/models")["data"]:
        for key, value in card.items():
            print(f"{key}: {value}")
    return 0
