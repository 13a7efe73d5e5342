"""The worker supervisor survives failing to start a worker, and says so.

Real child processes (spawn), but a light worker instead of a whole server: what
is tested is the supervisor, :class:`ca.workers.WorkerPool`. Kept apart from
test_workers.py so each spawned child imports only this small module.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from ca.config.server import load_config
from ca.health import HealthServer, ReadinessChecks
from ca.metrics import WORKER_RESTARTS, WORKER_SPAWN_FAILURES
from ca.ratelimit import BucketTable
from ca.workers import WorkerPool
from tests.integration.test_operations import _get, _metric


def light_worker(_args: Any, ready: Any) -> None:
    """Stands in for worker_main: listens at once, runs until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready.set()
    stop.wait()


class FlakyPool(WorkerPool):
    """Starting a worker raises while ``failing`` is set (as fork does out of memory)."""

    failing = False

    def _spawn(self, index: int) -> tuple[Any, Any]:
        if self.failing:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return super()._spawn(index)


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _events(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == message]


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[FlakyPool]:
    config = load_config(overrides={"trust_domain": "example.org",
                                    "data_dir": str(tmp_path)})
    p = FlakyPool(config, count=2, table=BucketTable(8), bind_address="127.0.0.1:1",
                  target=light_worker, restart_delay=0.05, max_backoff=0.2)
    p.start()
    try:
        yield p
    finally:
        p.stop()


def test_a_slot_that_cannot_spawn_is_retried_reported_and_restored(
    pool: FlakyPool, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sigil.server")
    health = HealthServer("127.0.0.1:0", ready=ReadinessChecks(lambda: None, pool.not_ready),
                          registry=lambda: REGISTRY)
    health.start()
    try:
        assert _get(health.bound_address, "/ready")[0] == 200
        failures, restarts = WORKER_SPAWN_FAILURES._value.get(), WORKER_RESTARTS._value.get()

        pool.failing = True
        victim = pool._slots[0].proc
        assert victim is not None and victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        # Retried (with backoff), not given up: three failed attempts and counting.
        _wait(lambda: WORKER_SPAWN_FAILURES._value.get() >= failures + 3,
              "three failed attempts")
        assert pool.alive == 1
        status, _, body = _get(health.bound_address, "/ready")
        assert status == 503
        assert body.startswith("not ready: 1 of 2 worker processes cannot be started "
                               "(worker 0: "), body
        error = "BlockingIOError: [Errno 11] Resource temporarily unavailable"
        assert f"last: {error}); retrying" in body
        logged = _events(caplog, "worker spawn failed")
        assert len(logged) >= 3
        assert all(f["worker"] == 0 and f["error"] == error for f in logged), logged
        # The backoff doubles: 0.05s, 0.1s, then the 0.2s ceiling.
        assert [f["retry_in"] for f in logged[:3]] == ["0.05s", "0.1s", "0.2s"]
        _, _, text = _get(health.bound_address, "/metrics")
        assert (_metric(text, "sigil_worker_spawn_failures_total") or 0) >= failures + 3

        pool.failing = False
        _wait(lambda: pool.alive == 2 and pool.not_ready() is None, "the restored worker")
        assert _get(health.bound_address, "/ready")[0] == 200
        assert WORKER_RESTARTS._value.get() == restarts + 1
        replacement = pool._slots[0].proc
        assert replacement is not None and replacement.pid != victim.pid
        [recovered] = _events(caplog, "worker recovered")
        assert recovered["worker"] == 0 and recovered["attempts"] >= 3
    finally:
        health.stop()


def _exits_at_once(_args: Any, _ready: Any) -> None:
    raise SystemExit(3)


def test_a_worker_that_dies_before_listening_counts_as_a_failure(pool: FlakyPool) -> None:
    failures = WORKER_SPAWN_FAILURES._value.get()
    pool._target = _exits_at_once  # every new worker crashes at start (bad config, say)
    victim = pool._slots[1].proc
    assert victim is not None and victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    _wait(lambda: WORKER_SPAWN_FAILURES._value.get() >= failures + 2, "two crash-loop rounds")
    reason = pool.not_ready()
    assert reason is not None and "(worker 1: " in reason
    assert "exited before listening, exit code 3" in reason
    pool._target = light_worker
    _wait(lambda: pool.alive == 2 and pool.not_ready() is None, "the restored worker")


def test_an_unexpected_error_does_not_end_supervision(pool: FlakyPool) -> None:
    class Broken(Exception):
        pass

    calls = {"n": 0}
    real_check = pool._check

    def check_once_broken() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Broken("a bug")
        real_check()

    pool._check = check_once_broken  # type: ignore[method-assign]
    victim = pool._slots[0].proc
    assert victim is not None and victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    _wait(lambda: pool.alive == 2 and calls["n"] > 1, "the restart after the error")
    assert pool._thread.is_alive()
    assert pool.not_ready() is None
