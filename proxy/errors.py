"""The proxy's errors, rooted in :class:`identity.errors.SigilError`."""

from __future__ import annotations

from identity.errors import SigilError


class ProxyError(SigilError):
    """Anything the proxy refuses to start or run with."""


class ConfigError(ProxyError, ValueError):
    """A bad flag, address or configuration file (the CLI exits 2 with its message)."""


class PolicyError(ConfigError):
    """A policy (allow list) that cannot be used; the message names the line when it can."""


class WorkloadApiError(ProxyError):
    """A Workload API message that cannot be used (bad SVID, bad bundle, no SVID)."""


class WatcherStopped(ProxyError):
    """The Workload/Broker API watcher ended for good: the proxy exits non-zero (1)."""
