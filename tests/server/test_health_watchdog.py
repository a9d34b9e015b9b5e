"""Health turns NOT_SERVING when the engine stalls with work pending, and back when it moves."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from attnserve.server.app import NOT_SERVING, SERVING, Server
from attnserve.server.config import parse_config


def test_stall_flips_health_and_recovery_restores_it() -> None:
    server = Server(parse_config(["--model", "dummy:tiny", "--stall-timeout", "0.5"], environ={}))
    engine = SimpleNamespace(has_work=True, last_progress=time.monotonic())
    server.engine = engine  # a stand-in with the two facts the watchdog reads

    def status() -> int:
        return server.health._server_status[""]  # what Check("") answers

    async def scenario() -> list[int]:
        await server.set_health(SERVING)
        watcher = asyncio.create_task(server.watch_progress())
        seen = []
        await asyncio.sleep(1.6)  # pending work, no step for > 0.5 s
        seen.append(status())
        engine.last_progress = time.monotonic() + 60  # steps complete again (stays fresh for the test)
        await asyncio.sleep(1.2)
        seen.append(status())
        server._draining = True
        watcher.cancel()
        return seen

    assert asyncio.run(scenario()) == [NOT_SERVING, SERVING]
