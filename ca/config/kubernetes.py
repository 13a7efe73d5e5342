"""The server's Kubernetes settings: ``[node_attestors.k8s_psat]`` and ``[kubernetes]``.

Validated into :class:`KubernetesConfig`; ``ca.config.server`` merges :data:`DEFAULTS`
and calls :func:`validate`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.kubeapi import KubeApi, KubeApiError, KubeConnection
from attestation.node import AttestationResult
from attestation.node.k8s_psat import NAME as K8S_PSAT
from attestation.node.k8s_psat import ClusterConfig, K8sPsatVerifier, parse_clusters
from ca.config.pop import NAMES as POP_ATTESTORS
from ca.errors import ConfigError
from identity.configvalues import parse_duration
from identity.errors import InvalidValueError
from identity.spiffeid import TrustDomain

DEFAULTS: Mapping[str, object] = {"node_attestors": None, "kubernetes": None}
DEFAULT_CONTROLLER_RESYNC = "10m"
DEFAULT_CONFIGMAP_NAME = "sigil-bundle"
DEFAULT_CONFIGMAP_RESYNC = "1m"
_CONNECTION_KEYS = ("api_server", "token_path", "ca_path", "kube_config")


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """``[kubernetes.controller]``: the registration controller (on when present).

    Attributes:
        cluster: the cluster name of the k8s_psat agent IDs of its nodes.
        connection: how to reach its API.
        resync_interval: how often everything is listed and reconciled again.
    """

    cluster: str
    connection: KubeConnection
    resync_interval: dt.timedelta


@dataclass(frozen=True, slots=True)
class BundleConfigMapConfig:
    """``[kubernetes.bundle_configmap]``: the trust bundle in ConfigMaps.

    Attributes:
        namespaces: where the ConfigMap is kept.
        name: the ConfigMap's name.
        connection: how to reach the API.
        resync_interval: how often each ConfigMap is checked (recreated if deleted).
    """

    namespaces: tuple[str, ...]
    name: str
    connection: KubeConnection
    resync_interval: dt.timedelta


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """Validated Kubernetes settings.

    Attributes:
        psat_clusters: the k8s_psat clusters and how to reach each one's API; empty
            means k8s_psat is not enabled.
    """

    psat_clusters: tuple[tuple[ClusterConfig, KubeConnection], ...] = ()
    controller: ControllerConfig | None = None
    bundle_configmap: BundleConfigMapConfig | None = None


def validate(raw: Mapping[str, Any]) -> KubernetesConfig:
    """Validate the ``node_attestors`` and ``kubernetes`` tables.

    Raises:
        ConfigError: an unknown attestor, key or a bad value, naming the key.
    """
    clusters = _validate_attestors(raw.get("node_attestors"))
    controller, configmap = _validate_kubernetes(raw.get("kubernetes"), clusters)
    return KubernetesConfig(psat_clusters=clusters, controller=controller,
                            bundle_configmap=configmap)


def _validate_attestors(attestors: object) -> tuple[tuple[ClusterConfig, KubeConnection], ...]:
    if attestors is None:
        return ()
    if not isinstance(attestors, dict):
        raise ConfigError("node_attestors must be a table")
    for name in attestors:
        if name not in (K8S_PSAT, *POP_ATTESTORS):
            raise ConfigError(
                f"unknown key 'node_attestors.{name}' (configurable node attestors: "
                f"{', '.join((K8S_PSAT, *POP_ATTESTORS))}; join_token is always on)"
            )
    if K8S_PSAT not in attestors:
        return ()  # only x509pop / sshpop: ca/config/pop.py
    try:
        clusters = parse_clusters(attestors.get(K8S_PSAT))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return tuple(clusters)


def _connection(table: Mapping[str, Any], where: str,
                clusters: tuple[tuple[ClusterConfig, KubeConnection], ...]) -> KubeConnection:
    """Explicit connection keys; else the k8s_psat cluster's of the same name; else
    in-cluster."""
    given: dict[str, str] = {}
    for key in _CONNECTION_KEYS:
        if key in table:
            if not isinstance(table[key], str) or not table[key]:
                raise ConfigError(f"{where}.{key} must be a non-empty string")
            given[key] = table[key]
    if "api_server" in given and "token_path" not in given:
        raise ConfigError(f"{where}: api_server needs token_path (the API bearer token)")
    if given:
        return KubeConnection(api_server=given.get("api_server"),
                              **{k: Path(v) for k, v in given.items() if k != "api_server"})
    for cluster, connection in clusters:
        if cluster.name == table.get("cluster"):
            return connection
    return KubeConnection()


def _interval(table: Mapping[str, Any], where: str, default: str) -> dt.timedelta:
    value = table.get("resync_interval", default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}.resync_interval must be a duration such as \"5m\"")
    try:
        return parse_duration(value, allow_milliseconds=False)
    except InvalidValueError as exc:
        raise ConfigError(f"{where}.resync_interval: {exc}") from None


def _validate_kubernetes(
    table: object, clusters: tuple[tuple[ClusterConfig, KubeConnection], ...]
) -> tuple[ControllerConfig | None, BundleConfigMapConfig | None]:
    if table is None:
        return None, None
    if not isinstance(table, dict):
        raise ConfigError("kubernetes must be a table")
    for key in table:
        if key not in ("controller", "bundle_configmap"):
            raise ConfigError(f"unknown key 'kubernetes.{key}' (known: controller, "
                              "bundle_configmap)")
    controller = None
    ctl = table.get("controller")
    if ctl is not None:
        where = "kubernetes.controller"
        if not isinstance(ctl, dict):
            raise ConfigError(f"{where} must be a table")
        for key in sorted(set(ctl) - {"enabled", "cluster", "resync_interval",
                                      *_CONNECTION_KEYS}):
            raise ConfigError(f"unknown key '{where}.{key}'")
        enabled = ctl.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.enabled must be true or false")
        cluster = ctl.get("cluster")
        if not isinstance(cluster, str) or not _is_name(cluster):
            raise ConfigError(f"{where}.cluster is required: the cluster name of the "
                              "k8s_psat agent IDs (letters, digits, '-', '_', '.')")
        if enabled:
            controller = ControllerConfig(
                cluster=cluster, connection=_connection(ctl, where, clusters),
                resync_interval=_interval(ctl, where, DEFAULT_CONTROLLER_RESYNC))
    configmap = None
    cm = table.get("bundle_configmap")
    if cm is not None:
        where = "kubernetes.bundle_configmap"
        if not isinstance(cm, dict):
            raise ConfigError(f"{where} must be a table")
        for key in sorted(set(cm) - {"namespaces", "name", "cluster", "resync_interval",
                                     *_CONNECTION_KEYS}):
            raise ConfigError(f"unknown key '{where}.{key}'")
        namespaces = cm.get("namespaces")
        if (not isinstance(namespaces, list) or not namespaces
                or not all(isinstance(n, str) and _is_dns_label(n) for n in namespaces)):
            raise ConfigError(f"{where}.namespaces must be a non-empty list of namespace "
                              f"names, not {namespaces!r}")
        name = cm.get("name", DEFAULT_CONFIGMAP_NAME)
        if not isinstance(name, str) or not _is_dns_subdomain(name):
            raise ConfigError(f"{where}.name {name!r} is not a valid ConfigMap name")
        configmap = BundleConfigMapConfig(
            namespaces=tuple(dict.fromkeys(namespaces)), name=name,
            connection=_connection(cm, where, clusters),
            resync_interval=_interval(cm, where, DEFAULT_CONFIGMAP_RESYNC))
    return controller, configmap


_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _is_dns_label(value: str) -> bool:
    return bool(_LABEL.match(value))


def _is_dns_subdomain(value: str) -> bool:
    return len(value) <= 253 and all(_is_dns_label(p) for p in value.split("."))


def _is_name(value: str) -> bool:
    # Cluster names become a path segment of agent IDs and a part of entry owners.
    return bool(re.match(r"^[A-Za-z0-9._-]{1,128}$", value)) and value not in (".", "..")


NodeVerifier = Callable[[bytes], AttestationResult]


def node_verifiers(config: KubernetesConfig, trust_domain: TrustDomain) -> dict[str, NodeVerifier]:
    """The configured node attestors other than join_token, by name.

    Raises:
        ConfigError: a cluster's API client settings cannot be loaded.
    """
    if not config.psat_clusters:
        return {}
    clusters: dict[str, tuple[ClusterConfig, KubeApi]] = {}
    for cluster, connection in config.psat_clusters:
        try:
            clusters[cluster.name] = (cluster, KubeApi(connection))
        except KubeApiError as exc:
            raise ConfigError(f"node_attestors.k8s_psat.clusters.{cluster.name}: {exc}") from None
    return {K8S_PSAT: K8sPsatVerifier(trust_domain, clusters).verify}
