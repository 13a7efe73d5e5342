"""The server's operations settings: rate limits, worker processes, health and metrics,
and the agent API's connection limits.

Flat top-level keys of the server's TOML file (documented in
docs/configuration.md); :mod:`ca.config.server` merges them with the others and stores the
validated result as ``ServerConfig.ops``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ca.errors import ConfigError
from ca.ratelimit import RateLimit
from identity import configvalues
from identity.errors import InvalidValueError

DEFAULT_HEALTH_ADDRESS = "127.0.0.1:8080"
MAX_WORKER_PROCESSES = 256

DEFAULTS: Mapping[str, object] = {
    "worker_processes": 1,
    "health_address": DEFAULT_HEALTH_ADDRESS,
    "rate_limit_attestation_per_second": 5,
    "rate_limit_attestation_burst": 20,
    "rate_limit_signing_per_second": 500,
    "rate_limit_signing_burst": 1000,
    "agent_api_max_connections": 4096,
    "agent_api_max_connections_per_ip": 256,
    "agent_api_handshake_timeout": "10s",
    "agent_api_preface_timeout": "10s",
    "agent_api_unauthenticated_timeout": "60s",
}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How many agent API connections one process holds, and how long a silent one lives.

    Attributes:
        max_connections: connections at once (TLS handshakes included); beyond it the
            process stops accepting until one ends (lowered at start to what the
            open-file limit can hold).
        max_per_ip: connections at once from one client IP address (0: no limit);
            more from that address are closed as soon as they are accepted.
        handshake_timeout: seconds from accept to a completed TLS handshake.
        preface_timeout: seconds from the handshake to the client's HTTP/2
            connection preface (what every gRPC client sends first).
        unauthenticated_timeout: seconds a connection without a client certificate
            may stay open at all: it can only attest, which takes one call.
    """

    max_connections: int = 4096
    max_per_ip: int = 256
    handshake_timeout: float = 10.0
    preface_timeout: float = 10.0
    unauthenticated_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class OpsConfig:
    """Validated operations settings (defaults as in :data:`DEFAULTS`)."""

    worker_processes: int = 1
    health_address: str = DEFAULT_HEALTH_ADDRESS
    # RateLimit is frozen: sharing one default instance is safe.
    attestation_limit: RateLimit = RateLimit(5, 20)  # noqa: RUF009
    signing_limit: RateLimit = RateLimit(500, 1000)  # noqa: RUF009
    agent_api_limits: ConnectionLimits = ConnectionLimits()

    @property
    def workers(self) -> int:
        """The number of agent API processes (``worker_processes`` 0: one per core)."""
        return self.worker_processes or (os.cpu_count() or 1)


def _number(raw: Mapping[str, Any], key: str, *, integer: bool, minimum: float,
            maximum: float | None = None) -> float:
    value = raw[key]
    if isinstance(value, str):  # from a flag or the environment
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{key} must be {kind}, not {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum:g}..{maximum:g}" if maximum is not None else f">= {minimum:g}"
        raise ConfigError(f"{key} must be {bound}, not {value!r}")
    return value


def validate(raw: Mapping[str, Any]) -> OpsConfig:
    """Check the operations keys of a merged configuration.

    Raises:
        ConfigError: naming the key and the rule its value broke.
    """
    workers = int(_number(raw, "worker_processes", integer=True, minimum=0,
                          maximum=MAX_WORKER_PROCESSES))
    health = raw["health_address"]
    if not isinstance(health, str):
        raise ConfigError(f"health_address must be a string, not {health!r}")
    if health:
        try:
            configvalues.parse_host_port(health, allow_port_zero=True)
        except InvalidValueError as exc:
            raise ConfigError(f"health_address: {exc}") from None
    limits = []
    for kind in ("attestation", "signing"):
        rate = _number(raw, f"rate_limit_{kind}_per_second", integer=False, minimum=0)
        burst = int(_number(raw, f"rate_limit_{kind}_burst", integer=True, minimum=1))
        limits.append(RateLimit(per_second=rate, burst=burst))
    connections = ConnectionLimits(
        max_connections=int(_number(raw, "agent_api_max_connections", integer=True,
                                    minimum=1)),
        max_per_ip=int(_number(raw, "agent_api_max_connections_per_ip", integer=True,
                               minimum=0)),
        handshake_timeout=_seconds(raw, "agent_api_handshake_timeout"),
        preface_timeout=_seconds(raw, "agent_api_preface_timeout"),
        unauthenticated_timeout=_seconds(raw, "agent_api_unauthenticated_timeout"))
    return OpsConfig(worker_processes=workers, health_address=health,
                     attestation_limit=limits[0], signing_limit=limits[1],
                     agent_api_limits=connections)


def _seconds(raw: Mapping[str, Any], key: str) -> float:
    value = raw[key]
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a duration string like \"10s\", not {value!r}")
    try:
        return configvalues.parse_duration(value, allow_milliseconds=False).total_seconds()
    except InvalidValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
