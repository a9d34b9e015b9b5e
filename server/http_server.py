"""The HTTP door's server: uvicorn on the process's own event loop, beside gRPC.

The process wiring (server/app.py) owns the signals and the drain, so uvicorn is told to
leave them alone; stop() lets in-flight responses finish for a moment, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import uvicorn
from prometheus_client import CollectorRegistry

from attnserve.server.api.openai import HttpDoor, create_app
from attnserve.server.api.serving import GenerationService


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # SIGTERM drains the whole process, not uvicorn alone
        yield


class HttpServer:
    def __init__(
        self,
        service: GenerationService,
        is_serving: Callable[[], bool],
        registry: CollectorRegistry,
        token: str | None,
        *,
        explorer: bool = True,
    ) -> None:
        self.app = create_app(HttpDoor(service, is_serving, registry, token), explorer=explorer)
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind and serve in the background; returns the bound port (port 0: an ephemeral one)."""
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # a bind error: raise it
                raise OSError(f"the HTTP server on {host}:{port} stopped at start-up")
            await asyncio.sleep(0.01)
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
