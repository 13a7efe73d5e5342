"""Prometheus metrics of the server, and the hooks the rest of the server calls.

Counters and histograms live here as module-level objects; code records events
through the small functions below (``count_svid``, ``count_error``,
``observe_sync_seconds``) so no other module imports ``prometheus_client``.

Gauges that describe the datastore (entries, agents, CA key expiry) are not kept
up to date by the code that changes them: :class:`StateCollector` computes them
when ``/metrics`` is scraped, at most once per :data:`STATE_REFRESH_SECONDS`, from
the datastore (the source of truth, shared by every process).

With ``worker_processes`` > 1 the metrics of every worker are aggregated with
prometheus_client's multiprocess mode: ``ca.workers`` sets
``PROMETHEUS_MULTIPROC_DIR`` before any process imports this module, each
process writes its counters to files there, and the supervisor's ``/metrics``
reads them all with ``MultiProcessCollector`` (see docs/operations.md, "Health and
metrics").
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STATE_REFRESH_SECONDS = 10.0

SVID_TYPES = ("x509", "jwt", "wit", "agent")

SVIDS_ISSUED = Counter(
    "sigil_svids_issued", "SVIDs signed, by type (x509, jwt, wit, agent).", ["type"],
)
RPC_ERRORS = Counter(
    "sigil_rpc_errors", "gRPC calls that ended with an error status, by method and code.",
    ["api", "method", "code"],
)
RATE_LIMITED = Counter(
    "sigil_rate_limited", "Calls refused by a rate limit, by limit (attestation, signing).",
    ["limit"],
)
SYNC_SECONDS = Histogram(
    "sigil_sync_seconds", "Server time spent answering one agent sync.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

FEDERATION_REFRESHES = Counter(
    "sigil_federation_refreshes",
    "Foreign bundle fetches that succeeded, by trust domain (stored or unchanged).",
    ["trust_domain"],
)
FEDERATION_REFRESH_ERRORS = Counter(
    "sigil_federation_refresh_errors",
    "Foreign bundle fetches refused, by trust domain and reason (ca/federation/fetch.py).",
    ["trust_domain", "reason"],
)

WORKER_RESTARTS = Counter(
    "sigil_worker_restarts",
    "Worker processes started again by the supervisor after one exited.",
)
WORKER_SPAWN_FAILURES = Counter(
    "sigil_worker_spawn_failures",
    "Failed attempts to restart a worker process: starting it raised, or it exited "
    "before it listened (retried with backoff).",
)

KUBERNETES_RECONCILES = Counter(
    "sigil_kubernetes_reconciles",
    "Passes of the Kubernetes registration controller, by scope (all, pods).",
    ["scope"],
)
KUBERNETES_ENTRY_CHANGES = Counter(
    "sigil_kubernetes_entry_changes",
    "Entries the Kubernetes registration controller wrote, by change "
    "(created, updated, deleted, skipped: refused, e.g. two templates claim one identity).",
    ["change"],
)


def count_kubernetes_reconcile(*, everything: bool, created: int, updated: int,
                               deleted: int, skipped: int) -> None:
    """Record one pass of the registration controller and what it wrote."""
    KUBERNETES_RECONCILES.labels(scope="all" if everything else "pods").inc()
    for change, n in (("created", created), ("updated", updated), ("deleted", deleted),
                      ("skipped", skipped)):
        if n:
            KUBERNETES_ENTRY_CHANGES.labels(change=change).inc(n)


def count_federation_refresh(trust_domain: str, error_reason: str | None = None) -> None:
    """Record one foreign bundle fetch: ``error_reason`` None for a success."""
    if error_reason is None:
        FEDERATION_REFRESHES.labels(trust_domain=trust_domain).inc()
    else:
        FEDERATION_REFRESH_ERRORS.labels(trust_domain=trust_domain, reason=error_reason).inc()


def count_worker_restart() -> None:
    """Record one worker process started again after it exited."""
    WORKER_RESTARTS.inc()


def count_worker_spawn_failure() -> None:
    """Record one failed attempt to restart a worker process."""
    WORKER_SPAWN_FAILURES.inc()


def count_svid(svid_type: str, n: int = 1) -> None:
    """Record ``n`` SVIDs signed of ``svid_type`` (one of :data:`SVID_TYPES`)."""
    SVIDS_ISSUED.labels(type=svid_type).inc(n)


def count_error(api: str, method: str, code: str) -> None:
    """Record one call of ``api``/``method`` that ended with status ``code`` (its name)."""
    RPC_ERRORS.labels(api=api, method=method, code=code).inc()


def count_rate_limited(limit: str) -> None:
    """Record one call refused by the ``limit`` rate limit."""
    RATE_LIMITED.labels(limit=limit).inc()


def observe_sync_seconds(seconds: float) -> None:
    """Record the server time one agent sync took (the sync latency histogram)."""
    SYNC_SECONDS.observe(seconds)


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """What the datastore-derived gauges show."""

    entries: int
    agents: int
    # (kind, status) -> latest not_after (Unix seconds) of the CA keys in that state
    key_expiry: dict[tuple[str, str], int]


class StateCollector(Collector):
    """Gauges read from the datastore at scrape time, cached for a few seconds.

    Caching keeps a scrape cheap however often it comes: a Prometheus server and a
    few dashboards scraping every second cost one set of queries every
    ``refresh_seconds``, not one per scrape.
    """

    def __init__(self, read: Callable[[], StateSnapshot], *,
                 refresh_seconds: float = STATE_REFRESH_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._refresh = refresh_seconds
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cached: StateSnapshot | None = None
        self._read_at = 0.0

    def snapshot(self) -> StateSnapshot:
        """The cached snapshot, refreshed when older than the refresh interval."""
        with self._lock:
            now = self._monotonic()
            if self._cached is None or now - self._read_at >= self._refresh:
                self._cached = self._read()
                self._read_at = now
            return self._cached

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges (prometheus_client's collector interface)."""
        snap = self.snapshot()
        entries = GaugeMetricFamily("sigil_entries", "Registration entries in the datastore.")
        entries.add_metric([], snap.entries)
        yield entries
        agents = GaugeMetricFamily("sigil_agents", "Attested agents in the datastore.")
        agents.add_metric([], snap.agents)
        yield agents
        expiry = GaugeMetricFamily(
            "sigil_ca_key_expiry_timestamp_seconds",
            "End of life (Unix time) of the CA keys, by kind (x509, jwt, wit) and status.",
            labels=["kind", "status"],
        )
        for (kind, status), not_after in sorted(snap.key_expiry.items()):
            expiry.add_metric([kind, status], not_after)
        yield expiry


def build_registry(state: Collector | None, *, multiprocess_dir: str | None = None
                   ) -> CollectorRegistry:
    """The registry ``/metrics`` serves.

    Args:
        state: the datastore gauges (None: none, e.g. before the datastore is open).
        multiprocess_dir: aggregate the counters every worker wrote there (worker
            mode); None serves this process's own counters.
    """
    if multiprocess_dir is None:
        registry: CollectorRegistry = REGISTRY
        if state is not None:
            registry = CollectorRegistry()
            registry.register(_Chain([REGISTRY, state]))
        return registry
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    if state is not None:
        registry.register(state)
    return registry


class _Chain(Collector):
    """Several collectors (or registries) served as one."""

    def __init__(self, parts: Iterable[Collector]) -> None:
        self._parts = tuple(parts)

    def collect(self) -> Iterator[Metric]:
        for part in self._parts:
            yield from part.collect()


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process runs in worker mode."""
    return os.environ.get(MULTIPROC_ENV) or None
