"""Federation and OIDC discovery settings: ``[federation]`` and ``[oidc_discovery]``.

:mod:`ca.config.server` merges :data:`DEFAULTS` with the other keys and stores the result of
:func:`validate` as ``ServerConfig.federation``. Every key is in docs/configuration.md.

    [federation]
    refresh_min_interval = "30s"
    refresh_max_interval = "1h"
    refresh_default_interval = "5m"
    fetch_timeout = "10s"
    web_ca_file = "/etc/ssl/private-roots.pem"   # https_web roots; default: the system's
    [federation.bundle_endpoint]
    address = "0.0.0.0:8443"
    profile = "https_web"                        # or "https_spiffe"
    refresh_hint = "5m"
    max_connections = 64
    max_connections_per_ip = 8
    request_timeout = "10s"
    cert_file = "/etc/sigil/endpoint.crt"        # https_web only
    key_file = "/etc/sigil/endpoint.key"
    [[federation.relationships]]
    trust_domain = "other.org"
    bundle_endpoint_url = "https://other.example:8443/"
    profile = "https_spiffe"
    endpoint_spiffe_id = "spiffe://other.org/sigil/server"
    bootstrap_bundle_file = "/etc/sigil/other.org.json"
    [oidc_discovery]
    address = "0.0.0.0:8444"
    domain = "oidc.example.org"
    cert_file = "/etc/sigil/oidc.crt"
    key_file = "/etc/sigil/oidc.key"
    omit_post_quantum_keys = true                # ML-DSA keys left out of /keys
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ca.config.relationship import (
    PROFILE_HTTPS_SPIFFE,
    PROFILE_HTTPS_WEB,
    PROFILES,
    Relationship,
    load_bootstrap_bundle,
    new_relationship,
)
from ca.errors import ConfigError, InvalidArgumentError
from identity import configvalues
from identity.bundle import Bundle
from identity.errors import InvalidValueError
from identity.spiffeid import TrustDomain

DEFAULTS: Mapping[str, object] = {"federation": None, "oidc_discovery": None}

DEFAULT_REFRESH_MIN = dt.timedelta(seconds=30)
DEFAULT_REFRESH_MAX = dt.timedelta(hours=1)
DEFAULT_REFRESH_INTERVAL = dt.timedelta(minutes=5)
DEFAULT_FETCH_TIMEOUT = dt.timedelta(seconds=10)
DEFAULT_REFRESH_HINT = dt.timedelta(minutes=5)
DEFAULT_ENDPOINT_ADDRESS = "0.0.0.0:8443"
DEFAULT_ENDPOINT_MAX_CONNECTIONS = 64
DEFAULT_ENDPOINT_MAX_PER_IP = 8
DEFAULT_ENDPOINT_REQUEST_TIMEOUT = dt.timedelta(seconds=10)

_FEDERATION_KEYS = {"refresh_min_interval", "refresh_max_interval",
                    "refresh_default_interval", "fetch_timeout", "web_ca_file",
                    "bundle_endpoint", "relationships"}
_ENDPOINT_KEYS = {"address", "profile", "refresh_hint", "cert_file", "key_file",
                  "max_connections", "max_connections_per_ip", "request_timeout",
                  "omit_post_quantum_keys"}
_RELATIONSHIP_KEYS = {"trust_domain", "bundle_endpoint_url", "profile",
                      "endpoint_spiffe_id", "bootstrap_bundle_file"}
_OIDC_KEYS = {"address", "domain", "cert_file", "key_file", "omit_post_quantum_keys"}


@dataclass(frozen=True, slots=True)
class BundleEndpointConfig:
    """``[federation.bundle_endpoint]``: where and how we serve our bundle.

    Attributes:
        address: ``HOST:PORT`` to listen on (port 0 picks one).
        profile: ``https_web`` (certificate from files) or ``https_spiffe`` (our SVID).
        refresh_hint: the ``spiffe_refresh_hint`` we publish.
        cert_file: https_web: PEM certificate chain, re-read when it changes.
        key_file: https_web: its PEM private key.
        max_connections: connections served at once; more are closed at accept.
        max_connections_per_ip: of those, from one client address (0: no limit).
        request_timeout: from accept to the end of the request's headers.
        omit_post_quantum_keys: leave ML-DSA (``kty: AKP``) JWT and WIT keys out
            of the served bundle, for peers (SPIRE, go-spiffe) that refuse a
            whole bundle over a key type they do not know.
    """

    address: str
    profile: str
    refresh_hint: dt.timedelta
    cert_file: Path | None = None
    key_file: Path | None = None
    max_connections: int = DEFAULT_ENDPOINT_MAX_CONNECTIONS
    max_connections_per_ip: int = DEFAULT_ENDPOINT_MAX_PER_IP
    request_timeout: dt.timedelta = DEFAULT_ENDPOINT_REQUEST_TIMEOUT
    omit_post_quantum_keys: bool = True


@dataclass(frozen=True, slots=True)
class ConfiguredRelationship:
    """A ``[[federation.relationships]]`` item, with its bootstrap bundle if given."""

    relationship: Relationship
    bootstrap_bundle: Bundle | None = None


@dataclass(frozen=True, slots=True)
class OidcDiscoveryConfig:
    """``[oidc_discovery]``: the OIDC discovery endpoint (on when present).

    Attributes:
        address: ``HOST:PORT`` to listen on (port 0 picks one).
        domain: the host name the endpoint is reached at (issuer ``https://<domain>``).
        cert_file: PEM certificate chain for ``domain``, re-read when it changes.
        key_file: its PEM private key.
        omit_post_quantum_keys: leave ML-DSA (``kty: AKP``) JWT keys out of
            ``/keys`` (and their algorithms out of the discovery document), for
            relying parties whose JOSE library (go-jose, ...) refuses a whole
            JWKS over a key type it does not know.
    """

    address: str
    domain: str
    cert_file: Path
    key_file: Path
    omit_post_quantum_keys: bool = True


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """Validated federation settings (defaults as documented)."""

    refresh_min_interval: dt.timedelta = DEFAULT_REFRESH_MIN
    refresh_max_interval: dt.timedelta = DEFAULT_REFRESH_MAX
    refresh_default_interval: dt.timedelta = DEFAULT_REFRESH_INTERVAL
    fetch_timeout: dt.timedelta = DEFAULT_FETCH_TIMEOUT
    web_ca_file: Path | None = None
    bundle_endpoint: BundleEndpointConfig | None = None
    relationships: tuple[ConfiguredRelationship, ...] = ()
    oidc_discovery: OidcDiscoveryConfig | None = None


def _table(value: object, where: str, known: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table ([{where}]), not {value!r}")
    unknown = set(value) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                          f"(known: {', '.join(sorted(known))})")
    return value


def _str(table: Mapping[str, Any], where: str, key: str, *, required: bool = False,
         default: str | None = None) -> str | None:
    value = table.get(key, default)
    if value is None:
        if required:
            raise ConfigError(f"{where}: {key} is required")
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key} must be a non-empty string, not {value!r}")
    return value


def _duration(table: Mapping[str, Any], where: str, key: str,
              default: dt.timedelta) -> dt.timedelta:
    value = table.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key} must be a duration string like \"5m\", not {value!r}")
    try:
        return configvalues.parse_duration(value, allow_milliseconds=False)
    except InvalidValueError as exc:
        raise ConfigError(f"{where}.{key}: {exc}") from None


def _bool(table: Mapping[str, Any], where: str, key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key} must be true or false, not {value!r}")
    return value


def _count(table: Mapping[str, Any], where: str, key: str, default: int, *,
           minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}.{key} must be a whole number >= {minimum}, not {value!r}")
    return value


def _address(table: Mapping[str, Any], where: str, default: str | None) -> str:
    address = _str(table, where, "address", required=default is None, default=default)
    assert address is not None
    try:
        configvalues.parse_host_port(address, allow_port_zero=True)
    except InvalidValueError as exc:
        raise ConfigError(f"{where}.address: {exc}") from None
    return address


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value).expanduser().absolute()


def _endpoint(value: object) -> BundleEndpointConfig:
    where = "federation.bundle_endpoint"
    table = _table(value, where, _ENDPOINT_KEYS)
    profile = _str(table, where, "profile", default=PROFILE_HTTPS_WEB)
    if profile not in PROFILES:
        raise ConfigError(f"{where}.profile {profile!r} is not one of: {', '.join(PROFILES)}")
    cert_file = _str(table, where, "cert_file")
    key_file = _str(table, where, "key_file")
    if profile == PROFILE_HTTPS_WEB and (cert_file is None or key_file is None):
        raise ConfigError(f"{where}: profile https_web needs cert_file and key_file")
    if profile == PROFILE_HTTPS_SPIFFE and (cert_file or key_file):
        raise ConfigError(f"{where}: profile https_spiffe serves the server's own SVID; "
                          "remove cert_file and key_file")
    return BundleEndpointConfig(
        address=_address(table, where, DEFAULT_ENDPOINT_ADDRESS), profile=profile,
        refresh_hint=_duration(table, where, "refresh_hint", DEFAULT_REFRESH_HINT),
        cert_file=_path(cert_file), key_file=_path(key_file),
        max_connections=_count(table, where, "max_connections",
                               DEFAULT_ENDPOINT_MAX_CONNECTIONS, minimum=1),
        max_connections_per_ip=_count(table, where, "max_connections_per_ip",
                                      DEFAULT_ENDPOINT_MAX_PER_IP, minimum=0),
        request_timeout=_duration(table, where, "request_timeout",
                                  DEFAULT_ENDPOINT_REQUEST_TIMEOUT),
        omit_post_quantum_keys=_bool(table, where, "omit_post_quantum_keys", True))


def _relationships(value: object, own: TrustDomain) -> tuple[ConfiguredRelationship, ...]:
    if not isinstance(value, list):
        raise ConfigError("federation.relationships must be an array of tables "
                          "([[federation.relationships]])")
    out: list[ConfiguredRelationship] = []
    seen: set[TrustDomain] = set()
    for index, item in enumerate(value):
        where = f"federation.relationships[{index}]"
        table = _table(item, where, _RELATIONSHIP_KEYS)
        bootstrap_file = _str(table, where, "bootstrap_bundle_file")
        td_text = _str(table, where, "trust_domain", required=True)
        try:
            td = TrustDomain.parse(td_text or "")
            bootstrap = (None if bootstrap_file is None
                         else load_bootstrap_bundle(td, Path(bootstrap_file).expanduser()))
            rel = new_relationship(
                trust_domain=td_text or "",
                bundle_endpoint_url=_str(table, where, "bundle_endpoint_url", required=True)
                or "",
                profile=_str(table, where, "profile", required=True) or "",
                endpoint_spiffe_id=_str(table, where, "endpoint_spiffe_id") or "",
                own_trust_domain=own, has_bootstrap=bootstrap is not None,
            )
        except InvalidArgumentError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if rel.trust_domain in seen:
            raise ConfigError(f"{where}: trust domain {rel.trust_domain} is configured twice")
        seen.add(rel.trust_domain)
        out.append(ConfiguredRelationship(rel, bootstrap))
    return tuple(out)


def _oidc(value: object) -> OidcDiscoveryConfig:
    where = "oidc_discovery"
    table = _table(value, where, _OIDC_KEYS)
    domain = _str(table, where, "domain", required=True)
    assert domain is not None
    if "/" in domain or "@" in domain or domain != domain.strip():
        raise ConfigError(f"{where}.domain {domain!r} must be a host name (the issuer "
                          "is https://<domain>), without scheme, path or user")
    cert_file = _path(_str(table, where, "cert_file", required=True))
    key_file = _path(_str(table, where, "key_file", required=True))
    assert cert_file is not None and key_file is not None
    return OidcDiscoveryConfig(
        address=_address(table, where, None), domain=domain,
        cert_file=cert_file, key_file=key_file,
        omit_post_quantum_keys=_bool(table, where, "omit_post_quantum_keys", True))


def validate(raw: Mapping[str, Any], own_trust_domain: TrustDomain) -> FederationConfig:
    """Validate the ``federation`` and ``oidc_discovery`` tables.

    Raises:
        ConfigError: an unknown key or a bad value, naming it.
    """
    oidc = None if raw.get("oidc_discovery") is None else _oidc(raw["oidc_discovery"])
    fed = raw.get("federation")
    if fed is None:
        return FederationConfig(oidc_discovery=oidc)
    where = "federation"
    table = _table(fed, where, _FEDERATION_KEYS)
    low = _duration(table, where, "refresh_min_interval", DEFAULT_REFRESH_MIN)
    high = _duration(table, where, "refresh_max_interval", DEFAULT_REFRESH_MAX)
    if low > high:
        raise ConfigError("federation.refresh_min_interval must not be longer than "
                          "federation.refresh_max_interval")
    endpoint = table.get("bundle_endpoint")
    relationships = table.get("relationships")
    return FederationConfig(
        refresh_min_interval=low, refresh_max_interval=high,
        refresh_default_interval=_duration(table, where, "refresh_default_interval",
                                           DEFAULT_REFRESH_INTERVAL),
        fetch_timeout=_duration(table, where, "fetch_timeout", DEFAULT_FETCH_TIMEOUT),
        web_ca_file=_path(_str(table, where, "web_ca_file")),
        bundle_endpoint=None if endpoint is None else _endpoint(endpoint),
        relationships=() if relationships is None else _relationships(relationships,
                                                                       own_trust_domain),
        oidc_discovery=oidc,
    )


def oidc_issuer(domain: str) -> str:
    """The issuer for ``domain``: in the discovery document and in every JWT-SVID's ``iss``."""
    return f"https://{domain}"
