"""Server configuration: TOML file -> frozen dataclass, validated at load.

Precedence, lowest first: built-in defaults < the TOML file < the environment
variables in :data:`ENV_VARS` < command-line flags. Every key is documented in
docs/configuration.md.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ca.config import adminauth
from ca.config import authority as caconfig
from ca.config import federation as fedconfig
from ca.config import kubernetes as k8sconfig
from ca.config import operations as opsconfig
from ca.config import policy as policyconfig
from ca.config import pop as popconfig
from ca.config.dburl import parse_database_url
from ca.config.defaults import (
    DATABASE_FILE,
    DEFAULT_BIND_ADDRESS,
    DEFAULT_DATA_DIR,
    DEFAULT_SOCKET_PATH,
)
from ca.config.tomllines import KeyLines
from ca.errors import ConfigError
from identity import configvalues
from identity.errors import InvalidSpiffeIdError, InvalidValueError
from identity.keys import KeyType
from identity.logfmt import LOG_FORMATS, LOG_LEVELS
from identity.spiffeid import TrustDomain

__all__ = ["DATABASE_FILE", "DEFAULT_BIND_ADDRESS", "DEFAULT_DATA_DIR", "DEFAULT_SOCKET_PATH",
           "ServerConfig", "load_config"]

# The explicit, documented list of environment overrides: variable -> config key.
# Only these are read; anything else in the environment is ignored on purpose.
ENV_VARS: Mapping[str, str] = {
    "SIGIL_TRUST_DOMAIN": "trust_domain",
    "SIGIL_DATA_DIR": "data_dir",
    "SIGIL_DATABASE_URL": "database_url",
    "SIGIL_BIND_ADDRESS": "bind_address",
    "SIGIL_SERVER_SOCKET": "socket_path",
    "SIGIL_LOG_LEVEL": "log_level",
}

# Keys whose values are durations, with their defaults.
_DURATION_DEFAULTS: Mapping[str, str] = {
    "ca_ttl": "24h",
    "x509_svid_ttl": "1h",
    "jwt_svid_ttl": "5m",
    "agent_svid_ttl": "1h",
    "join_token_ttl": "10m",
}
_STRING_DEFAULTS: Mapping[str, str | None] = {
    "trust_domain": None,
    "data_dir": DEFAULT_DATA_DIR,
    "bind_address": DEFAULT_BIND_ADDRESS,
    "socket_path": DEFAULT_SOCKET_PATH,
    "database_url": None,
    "ca_key_type": KeyType.EC_P256.value,
    "jwt_key_type": KeyType.EC_P256.value,
    "log_level": "info",
    "log_format": "text",
}
# Operations (rate limits, worker processes, health and metrics): ca/config/operations.py.
_OPS_DEFAULTS: Mapping[str, object] = opsconfig.DEFAULTS
# Key manager, upstream authority, rotation timing: ca/config/authority.py.
_CA_DEFAULTS: Mapping[str, object] = caconfig.DEFAULTS
# Kubernetes (node_attestors.k8s_psat): ca/config/kubernetes.py.
_K8S_DEFAULTS: Mapping[str, object] = k8sconfig.DEFAULTS
# Federation and OIDC discovery: ca/config/federation.py.
_FED_DEFAULTS: Mapping[str, object] = fedconfig.DEFAULTS
# The issuance policy ([policy], [[policy.rule]]): ca/config/policy.py.
_POLICY_DEFAULTS: Mapping[str, object] = policyconfig.DEFAULTS
# Scoped admins and the audit log ([admin], [[admin.grant]]): ca/config/adminauth.py.
_ADMIN_DEFAULTS: Mapping[str, object] = adminauth.DEFAULTS
KNOWN_KEYS = (frozenset(_DURATION_DEFAULTS) | frozenset(_STRING_DEFAULTS)
              | frozenset(_OPS_DEFAULTS) | frozenset(_CA_DEFAULTS) | frozenset(_K8S_DEFAULTS)
              | frozenset(_FED_DEFAULTS) | frozenset(_POLICY_DEFAULTS)
              | frozenset(_ADMIN_DEFAULTS))


def parse_duration(text: str, *, key: str | None = None) -> dt.timedelta:
    """Parse ``"90s"``, ``"5m"``, ``"1h"``, ``"2d"`` or combinations like ``"1h30m"``.

    The server's durations are whole seconds at least: ``ms`` is not a unit here.

    Raises:
        ConfigError: the text is not a positive duration in that form (prefixed
            with ``key`` when given).
    """
    try:
        return configvalues.parse_duration(text, allow_milliseconds=False)
    except InvalidValueError as exc:
        raise ConfigError(f"{key}: {exc}" if key else str(exc)) from None


def parse_host_port(text: str, *, key: str = "bind_address") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 means any free port.

    Raises:
        ConfigError: no port, or a port outside 0..65535, naming ``key``.
    """
    try:
        return configvalues.parse_host_port(text, allow_port_zero=True)
    except InvalidValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The validated server configuration. Build it with :func:`load_config`."""

    trust_domain: TrustDomain
    data_dir: Path
    bind_address: str
    socket_path: Path
    database_url: str
    ca_ttl: dt.timedelta
    ca_key_type: KeyType
    jwt_key_type: KeyType
    x509_svid_ttl: dt.timedelta
    jwt_svid_ttl: dt.timedelta
    agent_svid_ttl: dt.timedelta
    join_token_ttl: dt.timedelta
    log_level: str
    log_format: str
    # Frozen, so one shared default instance is safe.
    ops: opsconfig.OpsConfig = opsconfig.OpsConfig()  # noqa: RUF009
    ca: caconfig.CaConfig = caconfig.CaConfig()  # noqa: RUF009
    kubernetes: k8sconfig.KubernetesConfig = k8sconfig.KubernetesConfig()  # noqa: RUF009
    federation: fedconfig.FederationConfig = fedconfig.FederationConfig()  # noqa: RUF009
    node_pop: popconfig.PopConfig = popconfig.PopConfig()  # noqa: RUF009
    policy: policyconfig.Policy = policyconfig.Policy()  # noqa: RUF009
    admin: adminauth.AdminConfig = adminauth.AdminConfig()  # noqa: RUF009

    @property
    def key_dir(self) -> Path:
        """Where the disk key manager keeps private keys."""
        return self.data_dir / "keys"


def _read_toml(path: Path) -> tuple[dict[str, Any], KeyLines | None]:
    """The document, and where its keys are when a table reports errors by line."""
    try:
        with path.open("rb") as fh:
            data = fh.read()
        doc = tomllib.loads(data.decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: not UTF-8 ({exc.reason})"
                          ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key in doc:
        if key not in KNOWN_KEYS:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
    # Only [policy] reports errors by line (ca/config/tomllines.py says how lines are found).
    lines = KeyLines(data.decode("utf-8")) if "policy" in doc else None
    return doc, lines


def _key_type(name: str, value: object) -> KeyType:
    try:
        return KeyType(value)
    except ValueError:
        allowed = ", ".join(k.value for k in KeyType)
        raise ConfigError(f"{name} {value!r} is not one of: {allowed}") from None


def _ca_key_type(value: object) -> KeyType:
    key_type = _key_type("ca_key_type", value)
    if key_type.jwt_only:
        # No TLS stack here can use an ML-DSA certificate (docs/standards.md).
        allowed = ", ".join(k.value for k in KeyType if not k.jwt_only)
        raise ConfigError(f"ca_key_type {value!r} is for JWT keys only (jwt_key_type); "
                          f"the CA key is one of: {allowed}")
    return key_type


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Build the configuration from defaults, a TOML file, the environment and flags.

    Args:
        path: the TOML file, or None for none.
        env: the environment (only :data:`ENV_VARS` are read); None reads nothing.
        overrides: command-line values by config key; None values are ignored.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: naming the file and key, or the bad value and the rule it broke.
    """
    document, lines = _read_toml(path) if path is not None else ({}, None)
    try:
        raw = configvalues.layer_settings(
            {**_STRING_DEFAULTS, **_DURATION_DEFAULTS, **_OPS_DEFAULTS, **_CA_DEFAULTS,
             **_K8S_DEFAULTS, **_FED_DEFAULTS, **_POLICY_DEFAULTS, **_ADMIN_DEFAULTS},
            document, env=env,
            env_vars=ENV_VARS, overrides=overrides, known_keys=KNOWN_KEYS,
        )
    except InvalidValueError as exc:
        raise ConfigError(str(exc)) from None
    return _validate(raw, file=path, lines=lines)


def _string(raw: Mapping[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, not {value!r}")
    return value


def _validate(raw: Mapping[str, Any], *, file: Path | None = None,
              lines: KeyLines | None = None) -> ServerConfig:
    if not raw.get("trust_domain"):
        raise ConfigError(
            "trust_domain is required (config key trust_domain, SIGIL_TRUST_DOMAIN "
            "or --trust-domain)"
        )
    try:
        trust_domain = TrustDomain.parse(_string(raw, "trust_domain"))
    except InvalidSpiffeIdError as exc:
        raise ConfigError(f"trust_domain: {exc}") from None

    durations: dict[str, dt.timedelta] = {}
    for key in _DURATION_DEFAULTS:
        durations[key] = parse_duration(raw[key], key=key)
    for key in ("x509_svid_ttl", "jwt_svid_ttl", "agent_svid_ttl"):
        if durations[key] > durations["ca_ttl"]:
            raise ConfigError(
                f"{key} ({raw[key]}) must not be longer than ca_ttl ({raw['ca_ttl']})"
            )

    data_dir = Path(_string(raw, "data_dir")).expanduser().absolute()
    bind_address = _string(raw, "bind_address")
    parse_host_port(bind_address)
    socket_path = Path(_string(raw, "socket_path")).expanduser().absolute()
    database_url = raw.get("database_url") or f"sqlite:///{data_dir / DATABASE_FILE}"
    if not isinstance(database_url, str):
        raise ConfigError(f"database_url must be a string, not {database_url!r}")
    parse_database_url(database_url)  # the scheme and driver, at load time

    log_level = _string(raw, "log_level").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level {log_level!r} is not one of: {', '.join(LOG_LEVELS)}")
    log_format = _string(raw, "log_format").lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format {log_format!r} is not one of: {', '.join(LOG_FORMATS)}")

    ops, ca = opsconfig.validate(raw), caconfig.validate(raw)
    if ca.key_manager == "memory" and ops.workers > 1:
        # Each worker loads the CA keys the main process made; memory keys are
        # the main process's alone.
        raise ConfigError(
            f"key_manager \"memory\" keeps the CA keys in one process; worker_processes "
            f"({ops.workers} processes) needs \"disk\" or \"pkcs11\"")
    jwt_key_type = _key_type("jwt_key_type", raw["jwt_key_type"])
    if ca.key_manager == "pkcs11" and jwt_key_type.jwt_only:
        # Refused here, at start, rather than at the next scheduled JWT rotation,
        # where the failed key generation would stall rotation until expiry.
        raise ConfigError(
            f"jwt_key_type {jwt_key_type.value!r} needs key_manager \"disk\" or \"memory\": "
            "the PKCS#11 key store cannot make ML-DSA keys")

    return ServerConfig(
        trust_domain=trust_domain,
        data_dir=data_dir,
        bind_address=bind_address,
        socket_path=socket_path,
        database_url=database_url,
        ca_ttl=durations["ca_ttl"],
        ca_key_type=_ca_key_type(raw["ca_key_type"]),
        jwt_key_type=jwt_key_type,
        x509_svid_ttl=durations["x509_svid_ttl"],
        jwt_svid_ttl=durations["jwt_svid_ttl"],
        agent_svid_ttl=durations["agent_svid_ttl"],
        join_token_ttl=durations["join_token_ttl"],
        log_level=log_level,
        log_format=log_format,
        ops=ops,
        ca=ca,
        kubernetes=k8sconfig.validate(raw),
        node_pop=popconfig.validate(raw),
        federation=fedconfig.validate(raw, trust_domain),
        policy=policyconfig.validate(raw, trust_domain, file=file, lines=lines),
        admin=adminauth.validate(raw, trust_domain, data_dir),
    )
