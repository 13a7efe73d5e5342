"""When to rotate an SVID, and how long to wait after a failed sync.

Two small decisions the sync loop makes, kept apart so tests can drive them
without sleeping:

- :func:`rotation_due`: an X.509-SVID is replaced at half its lifetime, plus or
  minus :data:`ROTATION_JITTER` of it (so between 40 % and 60 %). Without the
  jitter, every SVID an agent got in one batch (after a restart, a CA rotation,
  a new node) would come due in the same second for ever after, and a fleet of
  agents would keep hitting the server in lock step. The jitter is derived from
  the certificate's serial number, not drawn at random: the decision is then the
  same on every tick and after a restart, and a test can compute it.
- :class:`Backoff`: after a failed sync, wait ``initial * 2**n`` (capped at
  ``maximum``), scaled by a random factor in ``[1 - JITTER, 1]`` ("equal
  jitter"), so agents that lost the server at the same moment do not all come
  back at the same moment either. A successful sync resets it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Callable

from identity.x509svid import X509Svid

ROTATION_JITTER = 0.1
"""Half of the rotation window, as a fraction of the SVID's lifetime."""

BACKOFF_JITTER = 0.5
"""How much of a backoff delay may be taken off at random."""


def rotation_fraction(serial: int) -> float:
    """Where in its lifetime an SVID with this serial rotates: 0.4 .. 0.6."""
    digest = hashlib.sha256(serial.to_bytes(20, "big", signed=False)).digest()
    unit = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return 0.5 - ROTATION_JITTER + 2 * ROTATION_JITTER * unit


def rotation_time(svid: X509Svid) -> dt.datetime:
    """The moment ``svid`` should be replaced (half-life +/- 10 % of its lifetime)."""
    leaf = svid.leaf
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    # Serials are positive and at most 20 bytes (RFC 5280 §4.1.2.2).
    serial = leaf.serial_number % (1 << 160)
    return start + (end - start) * rotation_fraction(serial)


def wit_rotation_time(issued_at: dt.datetime, expires_at: dt.datetime, token: str) -> dt.datetime:
    """When a WIT-SVID should be replaced: half-life +/- 10 %, as for X.509-SVIDs.

    The jitter comes from the token's hash (a WIT has no serial number), so it
    is as stable and as spread as the X.509 one.
    """
    digest = hashlib.sha256(token.encode("ascii")).digest()
    fraction = rotation_fraction(int.from_bytes(digest[:20], "big"))
    return issued_at + (expires_at - issued_at) * fraction


def rotation_due(svid: X509Svid, now: dt.datetime) -> bool:
    """True when ``svid`` is at or past its :func:`rotation_time`."""
    return now >= rotation_time(svid)


class Backoff:
    """Exponential backoff with jitter for the sync loop.

    Args:
        initial: the first delay after a failure.
        maximum: the cap (``backoff_max`` in the config).
        uniform: ``random.uniform``-like function (tests pass a fixed one).
    """

    def __init__(
        self,
        *,
        initial: dt.timedelta,
        maximum: dt.timedelta,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if initial <= dt.timedelta(0) or maximum < initial:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial = initial
        self.maximum = maximum
        self._uniform = uniform
        self.failures = 0

    def reset(self) -> None:
        """A sync succeeded: the next failure starts from ``initial`` again."""
        self.failures = 0

    def next_delay(self) -> dt.timedelta:
        """Record a failure and return how long to wait before retrying."""
        # 2**n overflows float long before it matters; 32 doublings pass any cap.
        exponent = min(self.failures, 32)
        self.failures += 1
        base = min(self.maximum, self.initial * (1 << exponent))
        return base * self._uniform(1 - BACKOFF_JITTER, 1.0)
