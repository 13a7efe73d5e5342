"""Injectable time: every component that reads the clock takes a :class:`Clock`.

Time is part of SVID validity, and the identity functions already take ``now``
explicitly; the server and the agent both read it through a :class:`Clock`, so
tests move it by hand instead of sleeping.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Protocol


class Clock(Protocol):
    """Something that tells the time."""

    def now(self) -> dt.datetime:
        """The current time as an aware UTC datetime."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> dt.datetime:
        """The current time as an aware UTC datetime."""
        return dt.datetime.now(dt.UTC)


class FakeClock:
    """A clock tests move by hand, so expiry and rotation are tested without sleeping."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        """The fake current time."""
        with self._lock:
            return self._now

    def advance(self, delta: dt.timedelta) -> None:
        """Move the clock forward by ``delta``."""
        with self._lock:
            self._now += delta
