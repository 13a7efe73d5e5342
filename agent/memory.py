"""Give the memory of a connection burst back to the system (glibc only).

Why: after a burst of Workload API connections (1,000 clients at once), Python
frees the connections' and relays' buffers, but glibc's malloc keeps the pages:
each thread that allocated (grpc's, asyncio's executor threads) gets an arena
of its own, and freed memory stays in those arenas. docs/benchmarks.md measured
the agent at 108 MiB with 10,000 SVIDs held and 160 MiB after the bursts.

The agent's front tells :class:`TrimAfterBurst` the open connection count:
when a burst is over (the count went above ``high`` and is back at or below
``low``) it calls ``malloc_trim(0)`` in a thread, off the event loop (it walks
every arena; 0.4-3 ms measured), at most once every ``min_interval`` seconds.
A no-op where the C library is not glibc (musl, macOS).

Limiting the arenas (``mallopt(M_ARENA_MAX, 2)`` at start, what
``MALLOC_ARENA_MAX=2`` does) was measured too: with the trim it gave nothing
more (128-132 MiB after the bursts either way), so the agent does not do it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from typing import Any

from agent import log


def glibc() -> Any | None:
    """The C library if it is glibc (has malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    return libc


class TrimAfterBurst:
    """Calls ``malloc_trim(0)`` once a burst of connections is over.

    Args:
        high: a burst is a connection count above this.
        low: the burst is over when the count is back at or below this.
        min_interval: seconds between two trims at least (a trim due sooner waits).
        libc: the C library (None: glibc if this is glibc; without
            ``malloc_trim`` this does nothing).
        clock: monotonic seconds (injectable).
    """

    def __init__(
        self, *, high: int = 64, low: int = 8, min_interval: float = 5.0,
        libc: Any | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        libc = libc if libc is not None else glibc()
        self._trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
        self.high = high
        self.low = low
        self.min_interval = min_interval
        self._clock = clock
        self._count = 0
        self._burst = False
        self._pending = False
        self._last: float | None = None
        self.trims = 0
        """How many trims ran (for tests and logs)."""

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def connections(self, count: int) -> None:
        """The open connection count changed to ``count`` (called on the loop)."""
        if self._trim is None:
            return
        self._count = count
        if count > self.high:
            self._burst = True
        elif count <= self.low and self._burst and not self._pending:
            self._schedule()

    def _schedule(self) -> None:
        self._burst = False
        self._pending = True
        loop = asyncio.get_running_loop()
        wait = 0.0 if self._last is None else self._last + self.min_interval - self._clock()
        if wait > 0:
            loop.call_later(wait, self._start, loop)
        else:
            self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._count > self.low:
            # Another burst began while this trim waited: trim after that one.
            self._pending = False
            self._burst = True
            return
        task = loop.create_task(self._run())
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())

    async def _run(self) -> None:
        try:
            start = time.perf_counter()
            await asyncio.to_thread(self._trim_now)
            log.event("memory trimmed after a connection burst",
                      ms=round((time.perf_counter() - start) * 1000, 2))
        finally:
            self._last = self._clock()
            self._pending = False
        if self._burst and self._count <= self.low:
            # A burst began and ended while this trim ran.
            self._schedule()

    def _trim_now(self) -> None:
        assert self._trim is not None
        self._trim(0)
        self.trims += 1
