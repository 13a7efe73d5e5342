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

Supervision: a worker that exits while the pool is running is restarted within
:data:`RESTART_DELAY` seconds. A slot that cannot keep a worker (starting the
process raises, or the new worker exits before it listens) is retried with a
backoff doubling up to :data:`MAX_RESTART_BACKOFF`, so it does not spin; each
failure is logged and counted (``sigil_worker_spawn_failures_total``), and while
a slot is failing :meth:`WorkerPool.not_ready` names it, which makes ``/ready``
answer 503. No error ends the supervising thread. :meth:`WorkerPool.stop` sends
SIGTERM to every worker, waits, and kills what is left. A worker whose main
process disappears (SIGKILL) stops itself.
Workers are started with ``spawn``, never ``fork``: the main process has threads
(gRPC, asyncio) that a fork would copy in an unknown state.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from typing import Any

from ca.config.server import ServerConfig
from ca.log import event
from ca.ratelimit import BucketTable

RESTART_DELAY = 1.0
"""Seconds between the supervisor's looks at its workers; the first retry's delay."""
MAX_RESTART_BACKOFF = 60.0
"""Longest wait between two attempts to restart a failing slot."""
STOP_TIMEOUT = 15.0
START_TIMEOUT = 60.0
_CTX = multiprocessing.get_context("spawn")


@dataclass(frozen=True, slots=True)
class _WorkerArgs:
    config: ServerConfig
    index: int
    table: BucketTable
    parent_pid: int


@dataclass(slots=True)
class _Slot:
    """What the supervisor knows of one worker slot."""

    proc: BaseProcess | None = None
    # Kept while the worker runs: a spawned child opens the parent's named
    # semaphores after start() returns, and a collected Event unlinks its own.
    ready: Any = None
    failures: int = 0  # consecutive: spawn raised, or the worker died before listening
    last_error: str = ""
    retry_at: float = field(default=0.0)


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
                 bind_address: str, target: Callable[[_WorkerArgs, Any], None] = worker_main,
                 restart_delay: float = RESTART_DELAY,
                 max_backoff: float = MAX_RESTART_BACKOFF,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """Args:
            config: the server configuration.
            count: how many worker processes (besides the main process).
            table: the shared rate-limit buckets.
            bind_address: the port the main process bound (resolves port 0).
            target: the worker's entry point (tests pass a light one).
            restart_delay: seconds between looks at the workers, and the first backoff.
            max_backoff: longest wait between two attempts for a failing slot.
            monotonic: the backoff clock.
        """
        self._config = replace(config, bind_address=bind_address)
        self._count = count
        self._table = table
        self._target = target
        self._restart_delay = restart_delay
        self._max_backoff = max_backoff
        self._monotonic = monotonic
        self._slots = [_Slot() for _ in range(count)]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="worker-pool",
                                        daemon=True)
        self.restarts = 0

    def _spawn(self, index: int) -> tuple[BaseProcess, Any]:
        ready = _CTX.Event()
        proc = _CTX.Process(
            target=self._target, name=f"sigil-worker-{index}",
            args=(_WorkerArgs(self._config, index, self._table, os.getpid()), ready),
        )
        proc.start()
        slot = self._slots[index]
        slot.proc, slot.ready = proc, ready
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
        return sum(1 for s in self._slots if s.proc is not None and s.proc.is_alive())

    def not_ready(self) -> str | None:
        """None while the pool keeps its workers, else why not (a readiness check)."""
        if self._stopping.is_set():
            return None  # stopping on purpose; the server says so itself
        if self._thread.ident is not None and not self._thread.is_alive():
            return "worker supervisor stopped"
        failing = [(i, s) for i, s in enumerate(self._slots) if s.failures]
        if not failing:
            return None
        index, slot = failing[0]
        return (f"{len(failing)} of {self._count} worker processes cannot be started "
                f"(worker {index}: {slot.failures} attempts, last: {slot.last_error}); "
                "retrying")

    def _supervise(self) -> None:
        while not self._stopping.wait(self._restart_delay):
            try:
                self._check()
            except Exception as exc:
                # This thread is the only one that restarts workers: it must outlive
                # anything, and say what went wrong.
                event("worker supervision failed", level=logging.ERROR,
                      error=f"{type(exc).__name__}: {exc}")

    def _backoff(self, slot: _Slot, now: float, error: str) -> float:
        slot.failures += 1
        slot.last_error = error
        delay = min(self._max_backoff, self._restart_delay * 2.0 ** (slot.failures - 1))
        slot.retry_at = now + delay
        return delay

    def _check(self) -> None:
        from ca.metrics import count_worker_restart, count_worker_spawn_failure

        for index, slot in enumerate(self._slots):
            if self._stopping.is_set():
                return
            now = self._monotonic()
            proc = slot.proc
            if proc is not None:
                if proc.is_alive():
                    if slot.failures and slot.ready.is_set():
                        event("worker recovered", worker=index, pid=proc.pid,
                              attempts=slot.failures)
                        slot.failures, slot.last_error = 0, ""
                    continue
                listened = slot.ready is not None and slot.ready.is_set()
                slot.proc = None
                _mark_dead(proc.pid)
                if listened:
                    event("worker exited, restarting", level=logging.WARNING, worker=index,
                          pid=proc.pid, exit_code=proc.exitcode)
                    slot.retry_at = now
                else:  # a crash loop: back off like a failed spawn
                    delay = self._backoff(slot, now, f"exited before listening, exit code "
                                                     f"{proc.exitcode}")
                    event("worker exited before listening", level=logging.ERROR,
                          worker=index, pid=proc.pid, exit_code=proc.exitcode,
                          retry_in=f"{delay:g}s")
                    count_worker_spawn_failure()
            if now < slot.retry_at:
                continue
            try:
                self._spawn(index)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                delay = self._backoff(slot, now, error)
                event("worker spawn failed", level=logging.ERROR, worker=index,
                      error=error, retry_in=f"{delay:g}s")
                count_worker_spawn_failure()
                continue
            self.restarts += 1
            count_worker_restart()

    def stop(self) -> None:
        """SIGTERM every worker, wait up to :data:`STOP_TIMEOUT`, then kill the rest."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        procs = [s.proc for s in self._slots if s.proc is not None]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
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
