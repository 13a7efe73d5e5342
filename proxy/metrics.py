"""The proxy's Prometheus metrics, in a registry of its own, served on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from proxy.config import Address


class Metrics:
    """Every metric the proxy exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.denied = Counter(
            "sigil_proxy_denied", "Connections refused, by listener and reason.",
            ["listener", "reason"], registry=self.registry)
        self.connections = Counter(
            "sigil_proxy_connections", "Connections allowed and relayed, by listener.",
            ["listener"], registry=self.registry)
        self.active = Gauge(
            "sigil_proxy_active_connections", "Connections open now, by listener.",
            ["listener"], registry=self.registry)
        self.upstream_failures = Counter(
            "sigil_proxy_upstream_failures", "Allowed connections whose target could not "
            "be reached, by listener.", ["listener"], registry=self.registry)
        self.svid_expiry = Gauge(
            "sigil_proxy_svid_expiry_timestamp_seconds",
            "When the SVID the proxy presents expires (Unix time).", registry=self.registry)
        self.svid_updates = Counter(
            "sigil_proxy_svid_updates", "SVID or bundle updates taken from the Workload API.",
            registry=self.registry)
        self.policy_reloads = Counter(
            "sigil_proxy_policy_reloads", "Config file reloads, by result (ok, refused).",
            ["result"], registry=self.registry)

    def serve(self, address: Address) -> None:
        """Serve /metrics on ``address`` (a daemon thread).

        Raises:
            OSError: the address cannot be bound.
        """
        start_http_server(address.port, addr=address.host, registry=self.registry)
