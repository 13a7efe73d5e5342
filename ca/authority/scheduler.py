"""Run :meth:`CertificateAuthority.tick` on a schedule (APScheduler).

The scheduler only says *when* to look; every decision is in ``tick()``, made
from the authority's injectable clock, so tests call ``tick()`` directly after
moving a FakeClock and never wait for this thread.
"""

from __future__ import annotations

import datetime as dt
import logging

from apscheduler.schedulers.background import BackgroundScheduler

from ca.authority import CertificateAuthority
from ca.log import event


class RotationScheduler:
    """A background job: rotation steps and bundle refresh every ``interval``."""

    def __init__(self, authority: CertificateAuthority, interval: dt.timedelta) -> None:
        self._authority = authority
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self._run, "interval",
                                seconds=max(1.0, interval.total_seconds()),
                                id="ca-rotation", max_instances=1, coalesce=True)

    def _run(self) -> None:
        try:
            self._authority.tick()
        except Exception as exc:
            event("ca rotation tick failed", level=logging.ERROR,
                  error=f"{exc.__class__.__name__}: {exc}", exc_info=True)

    def start(self) -> None:
        """Start the background thread."""
        self._scheduler.start()

    def stop(self) -> None:
        """Stop it (a running tick finishes first)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
