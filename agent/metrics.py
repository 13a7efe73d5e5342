"""Prometheus metrics of the agent, and the hooks the rest of the agent calls.

The counters are module-level and registered in no registry of prometheus_client's
global one: :func:`registry` builds the registry the agent's ``/metrics`` serves
(agent/httpserver.py), with the counters and a collector that reads the SVID cache
when scraped, so nothing has to keep a gauge up to date. Other modules record
events through the small functions below and never import ``prometheus_client``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

ROTATIONS = Counter(
    "sigil_agent_svid_rotations",
    "SVIDs the agent obtained, by type (workload: a workload's X.509-SVID, new or "
    "rotated; agent: the agent's own SVID renewed).", ["type"], registry=None,
)
WORKLOAD_API_CALLS = Counter(
    "sigil_agent_workload_api_calls", "Workload API calls received, by method.",
    ["method"], registry=None,
)
WORKLOAD_API_DENIALS = Counter(
    "sigil_agent_workload_api_denials",
    "Workload API calls refused with PERMISSION_DENIED, by reason (no_identity, "
    "attestation_failed, process_gone, process_changed, not_identified).",
    ["reason"], registry=None,
)


def count_rotation(kind: str) -> None:
    """Record one SVID obtained: ``kind`` is ``workload`` or ``agent``."""
    ROTATIONS.labels(type=kind).inc()


def count_call(method: str) -> None:
    """Record one Workload API call of ``method`` (e.g. ``FetchX509SVID``)."""
    WORKLOAD_API_CALLS.labels(method=method).inc()


def count_denial(reason: str) -> None:
    """Record one Workload API call refused for ``reason``."""
    WORKLOAD_API_DENIALS.labels(reason=reason).inc()


@dataclass(frozen=True, slots=True)
class State:
    """What the agent holds now, read at scrape time."""

    x509_svids: int
    """Workload X.509-SVIDs in the cache."""
    entries: int
    """Entries authorized for this agent."""
    agent_svid_expires_at: float | None
    """Unix time the agent's own SVID expires; None before attestation."""
    healthy: bool
    """The last sync with the server succeeded."""


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], State]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        state = self._read()
        yield GaugeMetricFamily("sigil_agent_svids_held",
                                "Workload X.509-SVIDs the agent holds.", value=state.x509_svids)
        yield GaugeMetricFamily("sigil_agent_entries",
                                "Entries authorized for this agent.", value=state.entries)
        if state.agent_svid_expires_at is not None:
            yield GaugeMetricFamily("sigil_agent_svid_expiry_timestamp_seconds",
                                    "When the agent's own SVID expires (unix time).",
                                    value=state.agent_svid_expires_at)
        yield GaugeMetricFamily("sigil_agent_healthy",
                                "1 when the last sync with the server succeeded, else 0.",
                                value=1.0 if state.healthy else 0.0)


def registry(read_state: Callable[[], State]) -> CollectorRegistry:
    """A registry with the agent's counters and its state gauges."""
    reg = CollectorRegistry(auto_describe=True)
    for collector in (ROTATIONS, WORKLOAD_API_CALLS, WORKLOAD_API_DENIALS):
        reg.register(collector)
    reg.register(_StateCollector(read_state))
    return reg


METRIC_NAMES = ("sigil_agent_svid_rotations_total", "sigil_agent_workload_api_calls_total",
                "sigil_agent_workload_api_denials_total", "sigil_agent_svids_held",
                "sigil_agent_entries", "sigil_agent_svid_expiry_timestamp_seconds",
                "sigil_agent_healthy")
"""Every series name /metrics may show (deploy/grafana checks its queries against it)."""
