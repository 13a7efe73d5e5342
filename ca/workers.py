"""Extra agent API processes (``worker_processes`` > 1), supervised by the main one.

Python signs in one core per process (the GIL), so to use every core the server
runs several processes that accept on the same agent API port: the main process
(everything: migrations, CA creation, admin API, health, and its share of the agent
API) and ``worker_processes - 1`` workers started with :class:`WorkerPool`. Each
listens with SO_REUSEPORT (the TLS front is ours, so it can), and the kernel spreads
new connections over them. Each worker has its own internal gRPC server, TLS
context and datastore engine; it loads the CA the main process created, and its
rotation scheduler reloads the slots, bundle and taints the main process changes
(``rotate=False``: a worker never rotates).

What is per process stays correct:

- rate limits use one shared-memory :class:`~ca.ratelimit.BucketTable`, handed to
  every worker, so a caller's limit is per server, not per process;
- metrics go through prometheus_client's multiprocess mode (the main process sets
  ``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus_client; its
  ``/metrics`` aggregates every process's files);
- everything else a worker knows comes from the datastore, the source of truth.

Supervision: a worker that exits while the pool is running is restarted (at most
once every :data:`RESTART_DELAY` seconds per slot, so a worker that cannot start
does not spin); :meth:`WorkerPool.stop` sends SIGTERM to every worker, waits, and
kills what is left. A worker whose main process disappears (SIGKILL) stops itself.
Workers are started with ``spawn``, never ``fork``: the main process has threads
(gRPC, asyncio) that a fork would copy in an unknown state.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from typing import Any

from ca.config import ServerConfig
from ca.log import event
from ca.ratelimit import BucketTable

RESTART_DELAY = 1.0
STOP_TIMEOUT = 15.0
START_TIMEOUT = 60.0
_CTX = multiprocessing.get_context("spawn")


@dataclass(frozen=True, slots=True)
class _WorkerArgs:
    config: ServerConfig
    index: int
    table: BucketTable
    parent_pid: int


def worker_main(args: _WorkerArgs, ready: Any) -> None:
    """Entry point of a worker process: serve the agent API until SIGTERM."""
    from ca import log
    from ca.server import ROLE_WORKER, SigilServer

    log.configure(level=args.config.log_level, fmt=args.config.log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = SigilServer(args.config, role=ROLE_WORKER, rate_table=args.table)
    try:
        server.start()
    except Exception as exc:
        event("worker failed to start", level=logging.ERROR, worker=args.index,
              error=f"{type(exc).__name__}: {exc}")
        server.stop(0)
        raise SystemExit(1) from None
    ready.set()
    try:
        # Poll for the main process: if it was killed, nobody would stop us.
        while not stop.wait(1.0):
            if os.getppid() != args.parent_pid:
                event("worker orphaned, stopping", level=logging.WARNING, worker=args.index)
                break
    finally:
        server.stop(grace=5.0)


class WorkerPool:
    """Starts, restarts and stops the extra agent API processes."""

    def __init__(self, config: ServerConfig, *, count: int, table: BucketTable,
                 bind_address: str) -> None:
        """Args:
            config: the server configuration.
            count: how many worker processes (besides the main process).
            table: the shared rate-limit buckets.
            bind_address: the port the main process bound (resolves port 0).
        """
        self._config = replace(config, bind_address=bind_address)
        self._count = count
        self._table = table
        self._procs: list[BaseProcess | None] = [None] * count
        # Kept while the worker runs: a spawned child opens the parent's named
        # semaphores after start() returns, and a collected Event unlinks its own.
        self._ready: list[Any] = [None] * count
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-pool",
                                        daemon=True)
        self.restarts = 0

    def _spawn(self, index: int) -> tuple[BaseProcess, Any]:
        ready = _CTX.Event()
        proc = _CTX.Process(
            target=worker_main, name=f"sigil-worker-{index}",
            args=(_WorkerArgs(self._config, index, self._table, os.getpid()), ready),
        )
        proc.start()
        self._procs[index] = proc
        self._ready[index] = ready
        event("worker started", worker=index, pid=proc.pid)
        return proc, ready

    def start(self) -> None:
        """Start every worker and wait until each listens.

        Raises:
            RuntimeError: a worker did not start within :data:`START_TIMEOUT`.
        """
        started = [self._spawn(i) for i in range(self._count)]
        for index, (proc, ready) in enumerate(started):
            if not ready.wait(START_TIMEOUT):
                self.stop()
                raise RuntimeError(f"worker {index} (pid {proc.pid}) did not start")
        self._thread.start()

    @property
    def alive(self) -> int:
        """How many workers are running."""
        return sum(1 for p in self._procs if p is not None and p.is_alive())

    def _supervise(self) -> None:
        while not self._stopping.wait(RESTART_DELAY):
            for index, proc in enumerate(self._procs):
                if proc is None or proc.is_alive() or self._stopping.is_set():
                    continue
                event("worker exited, restarting", level=logging.WARNING, worker=index,
                      pid=proc.pid, exit_code=proc.exitcode)
                _mark_dead(proc.pid)
                self.restarts += 1
                self._spawn(index)

    def stop(self) -> None:
        """SIGTERM every worker, wait up to :data:`STOP_TIMEOUT`, then kill the rest."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(STOP_TIMEOUT)
            if proc.is_alive():
                event("worker ignored SIGTERM, killing", level=logging.WARNING, pid=proc.pid)
                proc.kill()
                proc.join()
            _mark_dead(proc.pid)
        event("workers stopped", count=self._count)


def _mark_dead(pid: int | None) -> None:
    from ca.metrics import multiprocess_dir

    if pid is not None and multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
