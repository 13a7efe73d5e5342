"""Per-caller token buckets for attestation (by peer IP) and signing (by agent ID).

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second; a call
takes one token (signing: one per CSR), and a call that finds too few is refused
with RESOURCE_EXHAUSTED (:class:`RateLimitedError`).

The buckets live in shared memory so that the limit is per *server*, not per
worker process: with ``worker_processes`` > 1 the kernel spreads one caller's
connections over the workers (SO_REUSEPORT), and per-process buckets would let
it through N times as fast. The supervisor creates one :class:`BucketTable` and
hands it to every worker; a single process uses one the same way.

One lock guards the table: a POSIX record lock (``fcntl.lockf``) on an anonymous
file (memfd; elsewhere an unlinked temporary file) every process holds open, plus
a thread lock inside each process (record locks belong to a process, not a
thread). The kernel releases a record lock when its holder dies, so a worker
killed inside :meth:`BucketTable.take` cannot freeze the other processes, as a
shared semaphore would (nothing releases one whose holder is gone). What such a
worker leaves half-written is one slot, which can at worst hand one caller a
fresh bucket once.

The table is a fixed open-addressing hash table (no allocation per caller, so a
flood of new source addresses cannot grow memory): a caller's key is hashed to a
64-bit fingerprint; a slot whose bucket has refilled to ``burst`` carries no
information and is reused for a new caller. When every probed slot is busy the
caller shares its home slot, which can only make the limit stricter, never
looser.

Each kind of limit (attestation, signing) has its own region of slots: a slot is
only ever judged ("full", shared) with the limit of the buckets it holds. Were
they mixed, an unauthenticated attestation (burst 3) would judge an agent's
signing bucket full and take it over, and a signing probe would judge a drained
attestation bucket refilled early by the signing rate.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.sharedctypes import RawArray
from typing import Any

from ca.errors import ServerError

DEFAULT_SLOTS = 8192
PROBES = 8
ATTESTATION = 0
SIGNING = 1
KINDS = 2


def _count_rate_limited(kind: str) -> None:
    # ca.metrics imports prometheus_client, which picks its value store (per process
    # or multiprocess files) at import time: the config (which imports this module
    # for RateLimit) must not import it before `sigil-server run` has set
    # PROMETHEUS_MULTIPROC_DIR. It is also heavy for the admin CLI.
    from ca.metrics import count_rate_limited

    count_rate_limited(kind)


class RateLimitedError(ServerError):
    """A caller exceeded its rate limit (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One limit: ``per_second`` tokens a second, at most ``burst`` saved up.

    ``per_second`` == 0 disables the limit.
    """

    per_second: float
    burst: int

    @property
    def enabled(self) -> bool:
        """Whether calls are limited at all."""
        return self.per_second > 0


def _anonymous_file() -> Any:
    """A file with no name: nothing is left on disk, whatever way the server ends."""
    if hasattr(os, "memfd_create"):  # Linux: needs no writable directory either
        return open(os.memfd_create("sigil-ratelimit", os.MFD_CLOEXEC), "rb", buffering=0)
    return tempfile.TemporaryFile(prefix="sigil-ratelimit-")


class BucketTable:
    """Token buckets in shared memory, safe across threads and processes.

    Pass the table to a ``spawn`` child process as an argument: its arrays and the
    lock file's descriptor travel with it.
    """

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        """``slots`` buckets for each kind of limit (:data:`KINDS`)."""
        self._slots = slots
        self._keys: Any = RawArray("Q", slots * KINDS)  # 0 = empty
        self._tokens: Any = RawArray("d", slots * KINDS)
        self._stamps: Any = RawArray("d", slots * KINDS)
        self._lock_file: Any = _anonymous_file()
        self._fd: int = self._lock_file.fileno()
        self._thread_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # DupFd hands the descriptor to the child being spawned (as multiprocessing
        # does for the shared arrays' own file).
        return {"slots": self._slots, "keys": self._keys, "tokens": self._tokens,
                "stamps": self._stamps, "fd": reduction.DupFd(self._fd)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._slots = state["slots"]
        self._keys = state["keys"]
        self._tokens = state["tokens"]
        self._stamps = state["stamps"]
        self._fd = state["fd"].detach()
        # Owns the descriptor. Closing any descriptor of the file drops this
        # process's record locks on it, so it is closed only with the table.
        self._lock_file = open(self._fd, "rb", buffering=0, closefd=True)
        self._thread_lock = threading.Lock()

    def take(self, key: str, cost: int, limit: RateLimit, now: float, *,
             kind: int = ATTESTATION) -> float:
        """Take ``cost`` tokens from ``key``'s bucket of ``kind``.

        Every call for one ``kind`` must pass the same ``limit``: the slots of a
        kind are judged with it.

        Returns:
            0.0 when taken; otherwise the seconds until enough tokens are there
            (nothing is taken then).
        """
        # A stable fingerprint: hash() of a str differs between processes.
        fp = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") or 1
        if not 0 <= kind < KINDS:
            raise ValueError(f"no rate-limit kind {kind}")
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                slot = self._find(fp, kind * self._slots, limit, now)
                # ``now`` was read before the lock: another process may have stamped
                # the bucket with a later time since. Time never runs backwards for a
                # bucket (a negative refill would refuse a caller within its limit).
                stamp = self._stamps[slot]
                tokens = min(float(limit.burst), self._tokens[slot]
                             + max(0.0, now - stamp) * limit.per_second)
                self._stamps[slot] = max(stamp, now)
                if tokens >= cost:
                    self._tokens[slot] = tokens - cost
                    return 0.0
                self._tokens[slot] = tokens
                return float((cost - tokens) / limit.per_second)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _find(self, fp: int, base: int, limit: RateLimit, now: float) -> int:
        # Only the slots of the caller's kind: [base, base + slots).
        home = base + fp % self._slots
        reusable = -1
        for i in range(PROBES):
            slot = base + (fp + i) % self._slots
            owner = self._keys[slot]
            if owner == fp:
                return slot
            if reusable < 0 and (owner == 0 or self._full(slot, limit, now)):
                reusable = slot
        slot = home if reusable < 0 else reusable
        if self._keys[slot] != fp and reusable >= 0:
            self._keys[slot] = fp
            self._tokens[slot] = float(limit.burst)
            self._stamps[slot] = now
        return slot

    def _full(self, slot: int, limit: RateLimit, now: float) -> bool:
        refilled = self._tokens[slot] + (now - self._stamps[slot]) * limit.per_second
        return bool(refilled >= limit.burst)


class RateLimiter:
    """The server's two limits: attestation by peer IP, signing by agent ID.

    Time is a monotonic float (seconds) rather than the injectable wall clock:
    buckets measure elapsed time, and ``time.monotonic`` is the same clock in every
    process of the machine; tests inject their own.
    """

    def __init__(self, *, attestation: RateLimit, signing: RateLimit,
                 table: BucketTable | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.attestation = attestation
        self.signing = signing
        # One table (one lock, one object to hand to workers), a region per kind.
        self._table = table if table is not None else BucketTable()
        self._monotonic = monotonic

    @property
    def table(self) -> BucketTable:
        """The shared buckets (hand them to worker processes)."""
        return self._table

    def check_attestation(self, peer_ip: str) -> None:
        """Take one attestation token for ``peer_ip``.

        Raises:
            RateLimitedError: the address attested too often.
        """
        if not self.attestation.enabled:
            return
        wait = self._table.take(f"a|{peer_ip}", 1, self.attestation, self._monotonic(),
                                kind=ATTESTATION)
        if wait:
            _count_rate_limited("attestation")
            raise RateLimitedError(
                f"too many attestations from {peer_ip}: the limit is "
                f"{self.attestation.per_second:g}/s (burst {self.attestation.burst}); "
                f"retry in {wait:.1f}s"
            )

    def check_signing(self, agent_id: str, count: int) -> None:
        """Take ``count`` signing tokens (one per CSR) for ``agent_id``.

        Raises:
            RateLimitedError: the agent asked for too many signatures; a batch larger
                than the burst can never pass and says so.
        """
        if not self.signing.enabled or count <= 0:
            return
        if count > self.signing.burst:
            _count_rate_limited("signing")
            raise RateLimitedError(
                f"a batch of {count} CSRs exceeds the signing burst of "
                f"{self.signing.burst}; send smaller batches"
            )
        wait = self._table.take(f"s|{agent_id}", count, self.signing, self._monotonic(),
                                kind=SIGNING)
        if wait:
            _count_rate_limited("signing")
            raise RateLimitedError(
                f"agent {agent_id} asked for too many signatures: the limit is "
                f"{self.signing.per_second:g} CSRs/s (burst {self.signing.burst}); "
                f"retry in {wait:.1f}s"
            )
