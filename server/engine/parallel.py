"""Tensor-parallel ranks: rank 0 (the server process) drives workers that each hold one shard.

Every rank holds the same runner over its own shard of the model (model/parallel.py) and its own
slice of the KV cache (its heads; the same block ids everywhere). Rank 0 schedules; before each
runner call it broadcasts the call (the scheduler's plan: plain data, pickled once) to the workers,
and then every rank makes the same call, meeting the others at the model's collectives. Only rank
0 samples and answers.

A rank that dies cannot be replaced inside a running group: rank 0 reports it (``on_failure``),
the server goes NOT_SERVING and exits non-zero, and the process supervisor (Kubernetes) restarts
the whole group. Workers die with rank 0: a local worker by a parent-death signal, any worker by
its next collective failing on the closed connection.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from attnserve.model.errors import ModelLoadError
from attnserve.model.llama import LlamaForCausalLM
from attnserve.model.parallel import TensorParallel
from attnserve.server.engine.config import CacheConfig, ParallelConfig
from attnserve.server.engine.records import RunnerOutput, SchedulerOutput
from attnserve.server.engine.runner import ModelRunner

log = logging.getLogger("attnserve.parallel")

# A worker waits for the next step as long as the server idles; a collective inside a step that
# takes this long means a rank is gone or wedged.
IDLE_TIMEOUT = timedelta(days=365)
STEP_TIMEOUT = timedelta(minutes=5)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to build its shard and its runner (picklable: sent to spawned workers)."""

    model: str
    device: str
    dtype: str | None
    cache: CacheConfig
    batch_invariant: bool
    parallel: ParallelConfig
    master_port: int
    log_level: str = "INFO"

    @property
    def world_size(self) -> int:
        return self.parallel.tensor_parallel_size

    def local_rank(self, rank: int) -> int:
        return rank % self.parallel.ranks_per_node

    def rank_device(self, rank: int) -> str:
        """cuda:<local rank> for a CUDA model (one device per rank), else the device as given."""
        return f"cuda:{self.local_rank(rank)}" if self.device.startswith("cuda") else self.device


class RankGroup:
    """Rank 0's handle on the group: the command channel to the workers and the watch on them."""

    def __init__(
        self, spec: RankSpec, workers: list[multiprocessing.process.BaseProcess], on_failure: Callable[[str], None]
    ) -> None:
        self.spec = spec
        self._workers = workers
        self._commands: Any = None  # a gloo group (commands are pickled Python objects), once joined
        self._closed = False
        self.on_failure = on_failure

    def join(self) -> TensorParallel:
        """Join the group as rank 0 (waits for every rank)."""
        tp, self._commands = join_group(self.spec, 0)
        log.info("tensor parallel: rank 0 of %d joined (%s)", self.spec.world_size, dist.get_backend())
        return tp

    def send(self, method: str, **kwargs: Any) -> None:
        """Have every worker call ``runner.<method>(**kwargs)`` (rank 0 then makes the same call)."""
        dist.broadcast_object_list([(method, kwargs)], src=0, group=self._commands)

    def fail(self, reason: str) -> None:
        if not self._closed:
            self.on_failure(reason)

    def watch(self) -> None:
        """Report the first local worker that exits while the group is open (a thread, returns at once)."""
        sentinels = {w.sentinel: w for w in self._workers}

        def body() -> None:
            ready = multiprocessing.connection.wait(list(sentinels))
            worker = sentinels[ready[0]]  # type: ignore[index]
            worker.join(timeout=1)
            self.fail(
                f"tensor-parallel worker {worker.name} (pid {worker.pid}) exited with code {worker.exitcode}: "
                "the model is split across ranks and cannot be served without it"
            )

        if sentinels:
            threading.Thread(target=body, name="attnserve-rank-watch", daemon=True).start()

    def abandon(self) -> None:
        """End the workers without a word (rank 0 failed to start: they may not be listening yet)."""
        self._closed = True
        for worker in self._workers:
            worker.kill()

    def close(self, timeout: float = 10.0) -> None:
        """Tell the workers to exit and wait for them (the server is shutting down)."""
        if self._closed:
            return
        self._closed = True
        try:
            dist.broadcast_object_list([None], src=0, group=self._commands)
        except RuntimeError as exc:  # a worker already gone: nothing to tell it
            log.warning("could not stop the workers cleanly: %s", exc)
        for worker in self._workers:
            worker.join(timeout=timeout)
            if worker.is_alive():
                worker.kill()


class DrivingRunner(ModelRunner):
    """Rank 0's runner: each call is broadcast to the workers, then made here.

    Any failure inside a call leaves the ranks out of step (a collective one rank never reached), so
    it is reported to the group as fatal, not retried.
    """

    def __init__(
        self, model: LlamaForCausalLM, cache_config: CacheConfig, *, group: RankGroup, batch_invariant: bool = True
    ) -> None:
        self.group = group
        super().__init__(model, cache_config, batch_invariant=batch_invariant)

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        try:
            self.group.send("execute", plan=_for_workers(plan))
            return super().execute(plan)
        except Exception as exc:
            self.group.fail(f"a tensor-parallel step failed on rank 0: {exc!r}")
            raise

    def use_graph_decode(self, *, max_num_seqs: int, max_model_len: int) -> None:
        self.group.send("use_graph_decode", max_num_seqs=max_num_seqs, max_model_len=max_model_len)
        super().use_graph_decode(max_num_seqs=max_num_seqs, max_model_len=max_model_len)

    def close(self) -> None:
        self.group.close()


def _for_workers(plan: SchedulerOutput) -> SchedulerOutput:
    """The plan without what only rank 0 uses (compiled grammars: workers neither sample nor mask)."""
    if not any(item.params.constraint is not None for item in plan.requests):
        return plan
    items = [
        replace(item, params=replace(item.params, constraint=None)) if item.params.constraint is not None else item
        for item in plan.requests
    ]
    return replace(plan, requests=items)


# ---------------------------------------------------------------------------- start-up
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_workers(spec: RankSpec, ranks: range) -> list[multiprocessing.process.BaseProcess]:
    """Start one process per rank (spawned: a forked CUDA or OpenMP runtime is not safe to reuse)."""
    context = multiprocessing.get_context("spawn")
    workers = []
    for rank in ranks:
        worker = context.Process(target=worker_main, args=(spec, rank), name=f"rank-{rank}", daemon=True)
        worker.start()
        workers.append(worker)
    return workers


def join_group(spec: RankSpec, rank: int) -> tuple[TensorParallel, Any]:
    """Join the torch.distributed group as ``rank``: (the model's TensorParallel, the command group)."""
    device = spec.rank_device(rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    else:  # the node's cores shared between its ranks, not each rank taking them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.parallel.ranks_per_node))
    dist.init_process_group(
        backend,
        init_method=f"tcp://{spec.parallel.master_addr}:{spec.master_port}",
        rank=rank,
        world_size=spec.world_size,
        timeout=STEP_TIMEOUT,
    )
    commands = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TensorParallel.current(), commands


def start_driver(spec: RankSpec, on_failure: Callable[[str], None]) -> tuple[TensorParallel, RankGroup]:
    """On node 0: spawn this node's other ranks, join the group as rank 0, watch the workers."""
    group = RankGroup(spec, spawn_workers(spec, range(1, spec.parallel.ranks_per_node)), on_failure)
    group.watch()  # from now on: a worker that dies while we wait for it to join is reported too
    return group.join(), group


def worker_main(spec: RankSpec, rank: int) -> None:
    """A worker rank: load the shard, then make every call rank 0 broadcasts, until told to stop."""
    _die_with_parent()
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname)s rank-{rank} %(name)s %(message)s")
    from attnserve.model.loader import load_model, parse_dtype
    from attnserve.model.native_caches import cap_primitive_caches

    cap_primitive_caches()  # before the first linear, as build_engine does on rank 0
    tp, commands = join_group(spec, rank)
    dtype = parse_dtype(spec.dtype) if spec.dtype else None
    try:
        loaded = load_model(spec.model, device=spec.rank_device(rank), dtype=dtype, tp=tp)
    except ModelLoadError as exc:  # one line, not a traceback: rank 0 reports the same reason
        log.error("rank %d cannot load its shard: %s", rank, exc)
        sys.exit(2)
    runner = ModelRunner(loaded.model, spec.cache, batch_invariant=spec.batch_invariant)
    runner.is_driver = False
    log.info("tensor parallel: rank %d of %d serving its shard", rank, spec.world_size)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=commands)
        if box[0] is None:
            break
        method, kwargs = box[0]
        getattr(runner, method)(**kwargs)
    dist.destroy_process_group()


def run_worker_node(spec: RankSpec) -> int:
    """A node other than 0 (one pod of a LeaderWorkerSet): run its ranks, no doors. Returns the exit
    code: 0 when rank 0 stopped them, else the first failed rank's (the others are then ended)."""
    first = spec.parallel.node_rank * spec.parallel.ranks_per_node
    workers = spawn_workers(spec, range(first, first + spec.parallel.ranks_per_node))
    pending = {w.sentinel: w for w in workers}
    code = 0
    while pending:
        for sentinel in multiprocessing.connection.wait(list(pending)):
            worker = pending.pop(sentinel)  # type: ignore[call-overload]
            worker.join()
            if worker.exitcode and not code:
                code = 1
                log.error("%s exited with code %s: ending this node's other ranks", worker.name, worker.exitcode)
                for other in pending.values():
                    other.kill()
    return code


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent (the server) dies, however it dies.

    Signals meant for the server (Ctrl-C reaches the whole process group) are ignored: rank 0 drains
    and then stops its workers itself, which a worker that died first would turn into a failure.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the next collective fails on the closed socket instead
        pass
