"""Agent configuration: a TOML file -> frozen dataclasses, validated at load.

Precedence: defaults < TOML file < the documented ``SIGIL_AGENT_*`` environment
variables (:data:`ENV_VARS`) < command-line flags. Unknown keys are an error that
names the file and the key. Durations are strings (``"5s"``, ``"1m"``).
Every key is documented in docs/configuration.md, "Agent".

Example::

    trust_domain = "example.org"
    server_address = "sigil-server:8081"
    trust_bundle_path = "/etc/sigil/bundle.pem"
    sync_interval = "5s"

    [workload_attestors.unix]
    discover_workload_path = true
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.endpoint import parse_endpoint_address
from agent.errors import ConfigError, EndpointAddressError
from attestation.node import k8s_psat, sshpop, x509pop
from attestation.workload import k8s as k8s_workload
from attestation.workload.unix import UnixAttestorConfig
from identity import configvalues
from identity.errors import InvalidSpiffeIdError, InvalidValueError
from identity.logfmt import LOG_FORMATS, LOG_LEVELS
from identity.spiffeid import SpiffeId, TrustDomain

DEFAULT_DATA_DIR = "./.sigil-agent"
DEFAULT_SOCKET_PATH = "/run/sigil-agent/public/api.sock"
DEFAULT_SYNC_INTERVAL = "5s"
DEFAULT_SYNC_BACKOFF_MAX = "3m"
DEFAULT_SVID_CACHE_SIZE = 1000
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONNECTIONS_PER_UID = 256
DEFAULT_PREFACE_TIMEOUT = "10s"
DEFAULT_IDLE_TIMEOUT = "5m"

# The explicit, documented list of environment overrides: variable -> config key.
# Prefixed SIGIL_AGENT_ so a server and an agent can share one environment.
ENV_VARS: Mapping[str, str] = {
    "SIGIL_AGENT_TRUST_DOMAIN": "trust_domain",
    "SIGIL_AGENT_SERVER_ADDRESS": "server_address",
    "SIGIL_AGENT_DATA_DIR": "data_dir",
    "SIGIL_AGENT_SOCKET_PATH": "socket_path",
    "SIGIL_AGENT_JOIN_TOKEN": "join_token",
    "SIGIL_AGENT_TRUST_BUNDLE_PATH": "trust_bundle_path",
    "SIGIL_AGENT_LOG_LEVEL": "log_level",
    "SIGIL_AGENT_LOG_FORMAT": "log_format",
    "SIGIL_AGENT_HEALTH_ADDRESS": "health_address",
}

_DEFAULTS: Mapping[str, Any] = {
    "trust_domain": None,
    "server_address": None,
    "data_dir": DEFAULT_DATA_DIR,
    "socket_path": DEFAULT_SOCKET_PATH,
    "join_token": None,
    "trust_bundle_path": None,
    "insecure_bootstrap": False,
    "sync_interval": DEFAULT_SYNC_INTERVAL,
    "sync_backoff_max": DEFAULT_SYNC_BACKOFF_MAX,
    "svid_cache_size": DEFAULT_SVID_CACHE_SIZE,
    "helper": None,
    "log_level": "info",
    "log_format": "text",
    "workload_attestors": None,
    "node_attestor": None,
    "max_connections": DEFAULT_MAX_CONNECTIONS,
    "max_connections_per_uid": DEFAULT_MAX_CONNECTIONS_PER_UID,
    "connection_preface_timeout": DEFAULT_PREFACE_TIMEOUT,
    "connection_idle_timeout": DEFAULT_IDLE_TIMEOUT,
    "sds": None,
    "broker": None,
    "health_address": "",
}
KNOWN_KEYS = frozenset(_DEFAULTS)
_SDS_KEYS = frozenset({
    "enabled", "default_svid_name", "default_bundle_name", "default_all_bundles_name",
    "disable_spiffe_cert_validation",
})
_BROKER_KEYS = frozenset({"socket_path", "listen_address", "authorized"})
_ATTESTOR_KEYS: Mapping[str, frozenset[str]] = {
    "unix": frozenset({"discover_workload_path", "workload_path_sha256"}),
    "k8s": k8s_workload.CONFIG_KEYS,
}


@dataclass(frozen=True, slots=True)
class SdsSettings:
    """Envoy SDS on the Workload API socket (the ``[sds]`` table; docs/envoy.md).

    The resource names are SPIRE's, so Envoy configs written for SPIRE work
    unchanged.

    Attributes:
        enabled: serve ``envoy.service.secret.v3.SecretDiscoveryService``.
        default_svid_name: the name of the caller's first X.509-SVID.
        default_bundle_name: the name of the trust domain's own bundle.
        default_all_bundles_name: the name of one validation context holding every
            bundle the caller may see (Envoy's SPIFFE certificate validator).
        disable_spiffe_cert_validation: do not serve that one (an Envoy may also
            say so in its node metadata, key ``disable_spiffe_cert_validation``).
    """

    enabled: bool = True
    default_svid_name: str = "default"
    default_bundle_name: str = "ROOTCA"
    default_all_bundles_name: str = "ALL"
    disable_spiffe_cert_validation: bool = False


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """The SPIFFE Broker API (the ``[broker]`` table; docs/agent.md, "Broker API").

    Attributes:
        socket_path: the broker socket; None (the default): not served on a socket.
        listen_address: ``(ip, port)`` of the TCP endpoint with mutual TLS; None
            (the default): not served over TCP. With neither, the Broker API is off.
        authorized: the SPIFFE IDs of the brokers that may call it. On the socket a
            caller is attested like a workload, and one of the SPIFFE IDs its
            selectors entitle it to must be listed; over TCP the SPIFFE ID of its
            X.509-SVID (verified against the trust domain's bundle) must be.
    """

    socket_path: Path | None = None
    listen_address: tuple[str, int] | None = None
    authorized: tuple[SpiffeId, ...] = ()

    @property
    def enabled(self) -> bool:
        """Served on a socket, over TCP, or both."""
        return self.socket_path is not None or self.listen_address is not None


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The agent's validated configuration.

    Attributes:
        trust_domain: the trust domain the agent belongs to.
        server_address: the server's agent API, ``HOST:PORT``.
        data_dir: where the agent keeps its SVID, key and bundle (created 0700).
        socket_path: the Workload API socket.
        join_token: a single-use join token (needed only for the first attestation).
        trust_bundle_path: PEM CA certificates to verify the server with.
        insecure_bootstrap: trust the server's CA on first use when no bundle is known.
        sync_interval: how often to sync entries and rotate SVIDs.
        sync_backoff_max: the longest wait between sync attempts while they fail.
        svid_cache_size: how many X.509-SVIDs to keep beyond those in use.
        unix: options of the unix workload attestor.
        k8s: options of the k8s workload attestor; None when it is off.
        k8s_psat: attest the node with k8s_psat (instead of a join token); None: off.
        x509pop: attest the node with its X.509 certificate and key; None: off.
        sshpop: attest the node with its SSH host certificate and key; None: off.
        log_level: debug, info, warning or error.
        log_format: text or json.
        max_connections: Workload API connections open at once; more are
            accepted and closed at once.
        max_connections_per_uid: the same, for the connections of one uid.
        connection_preface_timeout: a Workload API connection that has not sent
            the HTTP/2 client preface this long after it was accepted is closed.
        connection_idle_timeout: a Workload API connection with no call in
            progress for this long is closed.
        sds: Envoy SDS on the Workload API socket.
        broker: the SPIFFE Broker API (off unless its socket or TCP address is set).
    """

    trust_domain: TrustDomain
    server_address: str
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    socket_path: Path = Path(DEFAULT_SOCKET_PATH)
    join_token: str | None = field(default=None, repr=False)
    trust_bundle_path: Path | None = None
    insecure_bootstrap: bool = False
    sync_interval: dt.timedelta = dt.timedelta(seconds=5)
    sync_backoff_max: dt.timedelta = dt.timedelta(minutes=3)
    svid_cache_size: int = DEFAULT_SVID_CACHE_SIZE
    unix: UnixAttestorConfig = field(default_factory=UnixAttestorConfig)
    log_level: str = "info"
    log_format: str = "text"
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    connection_preface_timeout: dt.timedelta = dt.timedelta(seconds=10)
    connection_idle_timeout: dt.timedelta = dt.timedelta(minutes=5)
    k8s: k8s_workload.K8sAttestorConfig | None = None
    k8s_psat: k8s_psat.AgentAttestorConfig | None = None
    sds: SdsSettings = field(default_factory=SdsSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    x509pop: x509pop.AgentAttestorConfig | None = None
    sshpop: sshpop.AgentAttestorConfig | None = None

    @property
    def uses_join_token(self) -> bool:
        """No other node attestor is configured: the agent attests with a join token."""
        return self.k8s_psat is None and self.x509pop is None and self.sshpop is None
    health_address: str = ""
    """``HOST:PORT`` of ``/live``, ``/ready`` and ``/metrics``; "" (the default): off."""


def parse_duration(text: object, *, key: str | None = None) -> dt.timedelta:
    """Parse ``"500ms"``, ``"5s"``, ``"1m"``, ``"1h"``, ``"2d"`` or ``"1m30s"``.

    Raises:
        ConfigError: not a positive duration in that form (prefixed with ``key``
            when given).
    """
    try:
        return configvalues.parse_duration(text)
    except InvalidValueError as exc:
        raise ConfigError(f"{key}: {exc}" if key else str(exc)) from None


def parse_host_port(text: str, *, key: str = "server_address") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6).

    Raises:
        ConfigError: no host, no port, or a port outside 1..65535, naming ``key``.
    """
    try:
        return configvalues.parse_host_port(text, allow_port_zero=False)
    except InvalidValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def load_toml(path: Path) -> dict[str, Any]:
    """A config file's TOML document, whatever its keys.

    Raises:
        ConfigError: unreadable, or not TOML (one line naming the file).
    """
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    doc = load_toml(path)
    for key in doc:
        if key not in KNOWN_KEYS:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
    sds = doc.get("sds")
    if sds is not None:
        if not isinstance(sds, dict):
            raise ConfigError(f"config file {path}: sds must be a table")
        for key in sds:
            if key not in _SDS_KEYS:
                raise ConfigError(f"config file {path}: unknown key 'sds.{key}'")
    broker = doc.get("broker")
    if broker is not None:
        if not isinstance(broker, dict):
            raise ConfigError(f"config file {path}: broker must be a table")
        for key in broker:
            if key not in _BROKER_KEYS:
                raise ConfigError(f"config file {path}: unknown key 'broker.{key}'")
    attestors = doc.get("workload_attestors")
    if attestors is not None:
        if not isinstance(attestors, dict):
            raise ConfigError(f"config file {path}: workload_attestors must be a table")
        for name, options in attestors.items():
            if name not in _ATTESTOR_KEYS:
                raise ConfigError(
                    f"config file {path}: unknown key 'workload_attestors.{name}' "
                    f"(known attestors: {', '.join(sorted(_ATTESTOR_KEYS))})"
                )
            if not isinstance(options, dict):
                raise ConfigError(
                    f"config file {path}: workload_attestors.{name} must be a table"
                )
            for key in options:
                if key not in _ATTESTOR_KEYS[name]:
                    raise ConfigError(
                        f"config file {path}: unknown key 'workload_attestors.{name}.{key}'"
                    )
    return doc


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the configuration from defaults, a TOML file, the environment and flags.

    Args:
        path: the TOML file, or None.
        env: the environment (only :data:`ENV_VARS` are read); None reads nothing.
        overrides: command-line values by config key; None values are ignored.

    Raises:
        ConfigError: naming the file and key, or the bad value and the rule it broke.
    """
    document = _read_toml(path) if path is not None else {}
    try:
        raw = configvalues.layer_settings(
            _DEFAULTS, document, env=env, env_vars=ENV_VARS, overrides=overrides,
            known_keys=KNOWN_KEYS,
        )
    except InvalidValueError as exc:
        raise ConfigError(str(exc)) from None
    return _validate(raw)


def _string(raw: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        if required:
            flag = "--" + key.replace("_", "-")
            env = next(v for v, k in ENV_VARS.items() if k == key)
            raise ConfigError(f"{key} is required (config key {key}, {env} or {flag})")
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {value!r}")
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    return value


def _count(raw: Mapping[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, str) and value.isdigit():
        value = int(value)  # from the environment or a flag
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
        raise ConfigError(f"{key} must be an integer from 1 to 1000000, not {value!r}")
    return value


def _sds(table: object) -> SdsSettings:
    if table is None:
        return SdsSettings()
    if not isinstance(table, dict):
        raise ConfigError("sds must be a table")
    defaults = SdsSettings()
    names = {}
    for key in ("default_svid_name", "default_bundle_name", "default_all_bundles_name"):
        value = table.get(key, getattr(defaults, key))
        # A resource name travels in every request: bounded like the SDS servicer's.
        if not isinstance(value, str) or not value or len(value.encode()) > 2048:
            raise ConfigError(f"sds.{key} must be a non-empty string of at most 2048 bytes, "
                              f"not {value!r}")
        names[key] = value
    if len(set(names.values())) != len(names):
        raise ConfigError(f"sds: default_svid_name, default_bundle_name and "
                          f"default_all_bundles_name must differ, not {sorted(names.values())}")
    return SdsSettings(
        enabled=_bool(table.get("enabled", True), "sds.enabled"),
        disable_spiffe_cert_validation=_bool(
            table.get("disable_spiffe_cert_validation", False),
            "sds.disable_spiffe_cert_validation"),
        **names,
    )


def _broker(table: object, *, workload_socket: Path) -> BrokerSettings:
    if table is None:
        return BrokerSettings()
    if not isinstance(table, dict):
        raise ConfigError("broker must be a table")
    path = table.get("socket_path", "")
    if not isinstance(path, str):
        raise ConfigError(f"broker.socket_path must be a string, not {path!r}")
    raw_ids = table.get("authorized", [])
    if not isinstance(raw_ids, list) or not all(isinstance(i, str) for i in raw_ids):
        raise ConfigError(f"broker.authorized must be a list of SPIFFE IDs, not {raw_ids!r}")
    ids: list[SpiffeId] = []
    for text in raw_ids:
        try:
            ids.append(SpiffeId.parse(text))
        except InvalidSpiffeIdError as exc:
            raise ConfigError(f"broker.authorized: {exc}") from None
    listen = _broker_listen_address(table.get("listen_address", ""))
    socket: Path | None = None
    if path:
        socket = Path(path)
        if not socket.is_absolute():
            raise ConfigError(f"broker.socket_path must be an absolute path, not {path!r}")
        if socket == workload_socket:
            raise ConfigError("broker.socket_path must differ from socket_path")
    if (socket is not None or listen is not None) and not ids:
        raise ConfigError("broker.authorized must list at least one SPIFFE ID when "
                          "broker.socket_path or broker.listen_address is set")
    return BrokerSettings(socket_path=socket, listen_address=listen, authorized=tuple(ids))


def _broker_listen_address(value: object) -> tuple[str, int] | None:
    """``IP:PORT`` (``[v6]:PORT``) of the broker's TCP endpoint; "" is off.

    The host must be an IP address, as in a ``tcp://`` ``SPIFFE_BROKER_SOCKET``
    (SPIFFE Broker Endpoint section 4): a name could resolve to an address that
    the operator did not mean to expose. Port 0 picks a free port (logged).
    """
    if not isinstance(value, str):
        raise ConfigError(f"broker.listen_address must be a string, not {value!r}")
    if not value:
        return None
    try:
        host, port = configvalues.parse_host_port(value, allow_port_zero=True)
    except InvalidValueError as exc:
        raise ConfigError(f"broker.listen_address: {exc}") from None
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"broker.listen_address: the host must be an IP address, not "
                          f"{host!r}") from None
    return host, port


def _validate(raw: Mapping[str, Any]) -> AgentConfig:
    td_text = _string(raw, "trust_domain", required=True)
    assert td_text is not None
    try:
        trust_domain = TrustDomain.parse(td_text)
    except InvalidSpiffeIdError as exc:
        raise ConfigError(f"trust_domain: {exc}") from None
    server_address = _string(raw, "server_address", required=True)
    assert server_address is not None
    parse_host_port(server_address)
    socket_text = _string(raw, "socket_path") or DEFAULT_SOCKET_PATH
    try:
        socket_path = Path(parse_endpoint_address(socket_text))
    except EndpointAddressError as exc:
        raise ConfigError(f"socket_path: {exc}") from None
    bundle = _string(raw, "trust_bundle_path")
    insecure = _bool(raw.get("insecure_bootstrap", False), "insecure_bootstrap")
    if bundle and insecure:
        raise ConfigError(
            "trust_bundle_path and insecure_bootstrap are mutually exclusive: give the "
            "server's CA bundle, or (only for a first try) trust it on first use"
        )
    sync_interval = parse_duration(
        raw.get("sync_interval", DEFAULT_SYNC_INTERVAL), key="sync_interval"
    )
    backoff_max = parse_duration(
        raw.get("sync_backoff_max", DEFAULT_SYNC_BACKOFF_MAX), key="sync_backoff_max"
    )
    if backoff_max < sync_interval:
        raise ConfigError(
            f"sync_backoff_max ({backoff_max}) must not be shorter than sync_interval "
            f"({sync_interval})"
        )
    cache_size = raw.get("svid_cache_size", DEFAULT_SVID_CACHE_SIZE)
    if isinstance(cache_size, str) and cache_size.strip().isdigit():
        cache_size = int(cache_size)  # from the environment or a flag
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
        raise ConfigError(f"svid_cache_size must be a whole number of at least 1, not "
                          f"{cache_size!r}")
    unix_opts = (raw.get("workload_attestors") or {}).get("unix") or {}
    unix = UnixAttestorConfig(
        discover_workload_path=_bool(
            unix_opts.get("discover_workload_path", False),
            "workload_attestors.unix.discover_workload_path",
        ),
        workload_path_sha256=_bool(
            unix_opts.get("workload_path_sha256", False),
            "workload_attestors.unix.workload_path_sha256",
        ),
    )
    level = (_string(raw, "log_level") or "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log_level {level!r} is not one of: {', '.join(LOG_LEVELS)}")
    fmt = (_string(raw, "log_format") or "text").lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log_format {fmt!r} is not one of: {', '.join(LOG_FORMATS)}")
    max_connections = _count(raw, "max_connections", DEFAULT_MAX_CONNECTIONS)
    per_uid = _count(raw, "max_connections_per_uid", DEFAULT_MAX_CONNECTIONS_PER_UID)
    preface_timeout = parse_duration(
        raw.get("connection_preface_timeout", DEFAULT_PREFACE_TIMEOUT),
        key="connection_preface_timeout")
    idle_timeout = parse_duration(
        raw.get("connection_idle_timeout", DEFAULT_IDLE_TIMEOUT), key="connection_idle_timeout")
    k8s_opts = (raw.get("workload_attestors") or {}).get("k8s")
    psat_table = raw.get("node_attestor")
    try:
        k8s = k8s_workload.parse_config(k8s_opts) if k8s_opts is not None else None
        psat = x509 = ssh = None
        if psat_table is not None:
            known = {k8s_psat.NAME, x509pop.NAME, sshpop.NAME}
            if (not isinstance(psat_table, dict) or set(psat_table) - known
                    or len(psat_table) != 1):
                raise ValueError("node_attestor must hold one table of: "
                                 "[node_attestor.k8s_psat], [node_attestor.x509pop], "
                                 "[node_attestor.sshpop] (join_token needs none)")
            if k8s_psat.NAME in psat_table:
                psat = k8s_psat.parse_agent_config(psat_table[k8s_psat.NAME])
            if x509pop.NAME in psat_table:
                x509 = x509pop.parse_agent_config(psat_table[x509pop.NAME])
            if sshpop.NAME in psat_table:
                ssh = sshpop.parse_agent_config(psat_table[sshpop.NAME])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    health_address = _string(raw, "health_address") or ""
    if health_address:
        try:
            configvalues.parse_host_port(health_address, allow_port_zero=True)
        except InvalidValueError as exc:
            raise ConfigError(f"health_address: {exc}") from None
    return AgentConfig(
        sds=_sds(raw.get("sds")),
        broker=_broker(raw.get("broker"), workload_socket=socket_path),
        health_address=health_address,
        k8s=k8s,
        k8s_psat=psat,
        x509pop=x509,
        sshpop=ssh,
        max_connections=max_connections,
        max_connections_per_uid=per_uid,
        connection_preface_timeout=preface_timeout,
        connection_idle_timeout=idle_timeout,
        trust_domain=trust_domain,
        server_address=server_address,
        data_dir=Path(_string(raw, "data_dir") or DEFAULT_DATA_DIR),
        socket_path=socket_path,
        join_token=_string(raw, "join_token"),
        trust_bundle_path=Path(bundle) if bundle else None,
        insecure_bootstrap=insecure,
        sync_interval=sync_interval,
        sync_backoff_max=backoff_max,
        svid_cache_size=cache_size,
        unix=unix,
        log_level=level,
        log_format=fmt,
    )
