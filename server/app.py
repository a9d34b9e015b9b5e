"""Process wiring: start the metrics server and the doors, load and warm the engine, health, drain.

Lifecycle: health NOT_SERVING -> load and warm up (one real forward) -> SERVING.
SIGTERM/SIGINT: NOT_SERVING, new calls refused with UNAVAILABLE, in-flight
requests get --shutdown-timeout seconds to finish, then the process exits 0.
Under tensor parallelism a rank that dies takes the server to NOT_SERVING and the
process exits 1 at once (the group cannot go on without it; the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from attnserve.model.errors import ModelLoadError
from attnserve.server.api.grpc import GeneratorServicer
from attnserve.server.api.grpc_interceptors import BearerTokenInterceptor, MalformedRequestInterceptor
from attnserve.server.api.serving import GenerationService
from attnserve.server.config import ServerConfig, parse_config
from attnserve.server.engine.request import SamplingParams
from attnserve.server.metrics import Metrics
from attnserve.v1 import generate_pb2, generate_pb2_grpc

if TYPE_CHECKING:
    from attnserve.server.engine.core import Engine
    from attnserve.server.engine.parallel import RankSpec
    from attnserve.server.http_server import HttpServer

log = logging.getLogger("attnserve")
SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXIT_RANK_FAILED = 1


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.health = health.aio.HealthServicer()
        self.metrics = Metrics(vllm_names=config.vllm_metric_names)
        self.service = GenerationService(self.metrics, config.limits, config.sampling_defaults)
        self.engine: Engine | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.http: HttpServer | None = None
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._serving = False
        self._draining = False
        self._stalled = False
        self.rank_failure = asyncio.Event()  # set when a tensor-parallel rank died: serve() ends the process
        self.rank_failure_reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None

    async def set_health(self, status: int) -> None:
        self._serving = status == SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Bind ports (health answers NOT_SERVING at once), then load, warm up and go SERVING."""
        c = self.config
        self._loop = asyncio.get_running_loop()
        self.metrics_port = self.metrics.serve(c.metrics_host, c.metrics_port)
        await self._start_grpc()
        if c.http_port is not None:
            from attnserve.server.http_server import HttpServer  # FastAPI only where the door is on

            self.http = HttpServer(
                self.service, lambda: self._serving, self.metrics.registry, self._token(), explorer=c.explorer
            )
            self.http_port = await self.http.start(c.http_host, c.http_port)
        log.info(
            "gRPC on %s:%d, HTTP on :%s, metrics on :%d (NOT_SERVING until warm)",
            c.host,
            self.port,
            self.http_port or "-",
            self.metrics_port,
        )
        self.engine = await asyncio.get_running_loop().run_in_executor(None, self._load_engine)
        await self._warm_up()
        self.metrics.bind_engine(self.engine)  # after warm-up: it is not traffic
        self.metrics.bind_attention_budget(self.service.attention_budget)
        self.service.attach(self.engine)
        await self.set_health(SERVING)
        info = self.engine.info()
        log.info(
            "SERVING %s (%s%s, %s, %d KV blocks of %d tokens, context %d)",
            info.model_name,
            info.device,
            f" x {info.tensor_parallel_size} ranks" if info.tensor_parallel_size > 1 else "",
            info.dtype,
            info.kv_cache_blocks,
            info.kv_cache_block_size,
            info.context_length,
        )

    def _token(self) -> str | None:
        path = self.config.auth_token_file
        return Path(path).read_text().strip() if path else None

    async def _start_grpc(self) -> None:
        c = self.config
        options = [
            ("grpc.max_receive_message_length", c.limits.max_request_bytes),
            ("grpc.max_send_message_length", c.limits.max_response_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
        token = self._token()
        if token:  # outermost: an unauthenticated caller learns nothing about its request
            interceptors.insert(0, BearerTokenInterceptor(token))
        self.grpc_server = grpc.aio.server(interceptors=interceptors, options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        generate_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(self.service), self.grpc_server)
        await self.set_health(NOT_SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc_server,
        )
        address = f"{c.host}:{c.port}"
        if c.tls_cert and c.tls_key:
            creds = grpc.ssl_server_credentials([(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())])
            self.port = self.grpc_server.add_secure_port(address, creds)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        await self.grpc_server.start()

    def _load_engine(self) -> Engine:
        # torch comes in here, not at import: `python -m server --help` stays quick.
        from attnserve.model.loader import load_model, parse_dtype
        from attnserve.server.engine.core import build_engine

        c = self.config
        dtype = parse_dtype(c.dtype) if c.dtype else None
        if c.parallel.tensor_parallel_size == 1:
            load = functools.partial(load_model, c.model, device=c.device, dtype=dtype)
            return build_engine(load, c.engine).start()
        from attnserve.server.engine.parallel import DrivingRunner, start_driver

        # Tensor parallelism: start the workers and join them as rank 0.
        tp, group = start_driver(rank_spec(c), on_failure=self.report_rank_failure)
        load = functools.partial(load_model, c.model, device=c.device, dtype=dtype, tp=tp)
        try:
            return build_engine(load, c.engine, functools.partial(DrivingRunner, group=group)).start()
        except BaseException:  # the load failed here (its reason is reported): the workers are no failure
            group.abandon()
            raise

    def report_rank_failure(self, reason: str) -> None:
        """Called from any thread: a rank is gone; serve() takes the server down."""
        log.critical("%s", reason)
        if self._loop is not None and not self.rank_failure.is_set():
            self.rank_failure_reason = reason
            with contextlib.suppress(RuntimeError):  # the loop already closed: the process is ending anyway
                self._loop.call_soon_threadsafe(self.rank_failure.set)

    async def fail_fast(self) -> None:
        """NOT_SERVING, calls refused, no drain: the model cannot run without the lost rank."""
        self._draining = True
        if self.engine is not None:
            self.engine.stop_accepting()
        await self.set_health(NOT_SERVING)
        log.critical("NOT_SERVING: exiting with code %d (%s)", EXIT_RANK_FAILED, self.rank_failure_reason)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)  # health watchers and open streams hear it first

    async def _warm_up(self) -> None:
        assert self.engine is not None
        tok = self.engine.tokenizer
        prompt = tok.encode("Hello") or [tok.bos_token_id or 0]
        out = await self.engine.generate(prompt, SamplingParams(max_tokens=2, ignore_eos=True))
        if out.error:
            raise RuntimeError(f"warm-up failed: {out.error}")

    async def watch_progress(self) -> None:
        """NOT_SERVING while the engine makes no progress with requests pending."""
        while not self._draining:
            await asyncio.sleep(1.0)
            engine = self.engine
            if engine is None:
                continue
            stalled = engine.has_work and time.monotonic() - engine.last_progress > self.config.stall_timeout
            if stalled != self._stalled and not self._draining:
                self._stalled = stalled
                log.error("engine stalled: no step finished for %.0fs", self.config.stall_timeout) if stalled else None
                await self.set_health(NOT_SERVING if stalled else SERVING)

    async def drain_and_stop(self) -> None:
        """Refuse new work, let in-flight requests finish (up to shutdown_timeout), stop."""
        if self._draining:
            return
        self._draining = True
        if self.engine is not None:
            self.engine.stop_accepting()  # before health flips, so NOT_SERVING always means refused
        log.info("draining: NOT_SERVING, in-flight requests get %.0fs", self.config.shutdown_timeout)
        await self.set_health(NOT_SERVING)
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown, self.config.shutdown_timeout)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2.0)  # lets the last stream messages reach their clients
        if self.http is not None:
            await self.http.stop()
        self.service.close()
        log.info("stopped")


async def serve(config: ServerConfig) -> int:
    server = Server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failed = asyncio.create_task(server.rank_failure.wait())
    try:
        starting = asyncio.create_task(server.start())
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({starting, waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()  # raise start-up errors
            watcher = asyncio.create_task(server.watch_progress())
            await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
            watcher.cancel()
        else:
            starting.cancel()
        if failed.done():
            await server.fail_fast()
            return EXIT_RANK_FAILED
    except (ModelLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if server.grpc_server is not None:  # bound before the load: stopped here, not left to a closed loop
            await server.grpc_server.stop(grace=None)
        if server.http is not None:
            await server.http.stop()
        return 2
    await server.drain_and_stop()
    return 0


def rank_spec(config: ServerConfig) -> RankSpec:
    """What each tensor-parallel rank needs to build its shard, from the server's flags."""
    from attnserve.server.engine.parallel import RankSpec, free_port

    p = config.parallel
    port = p.master_port or (free_port() if p.nnodes == 1 else 29500)
    engine = config.engine
    return RankSpec(
        config.model, config.device, config.dtype, engine.cache, engine.batch_invariant, p, port, config.log_level
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if config.parallel.node_rank > 0:  # a worker node: its ranks only, no doors
        from attnserve.server.engine.parallel import run_worker_node

        return run_worker_node(rank_spec(config))
    code = asyncio.run(serve(config))
    if code == EXIT_RANK_FAILED:  # threads blocked on the lost rank must not hold the exit
        logging.shutdown()
        os._exit(code)
    return code
