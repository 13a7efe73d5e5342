"""The server's Kubernetes settings: ``[node_attestors.k8s_psat]``.

Validated into :class:`KubernetesConfig`; ``ca.config`` merges :data:`DEFAULTS`
and calls :func:`validate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from attestation.kubeapi import KubeApi, KubeApiError, KubeConnection
from attestation.node import AttestationResult
from attestation.node.k8s_psat import NAME as K8S_PSAT
from attestation.node.k8s_psat import ClusterConfig, K8sPsatVerifier, parse_clusters
from ca.errors import ConfigError
from identity.spiffeid import TrustDomain

DEFAULTS: Mapping[str, object] = {"node_attestors": None}


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """Validated Kubernetes settings.

    Attributes:
        psat_clusters: the k8s_psat clusters and how to reach each one's API; empty
            means k8s_psat is not enabled.
    """

    psat_clusters: tuple[tuple[ClusterConfig, KubeConnection], ...] = ()


def validate(raw: Mapping[str, Any]) -> KubernetesConfig:
    """Validate the ``node_attestors`` table.

    Raises:
        ConfigError: an unknown attestor, key or a bad value, naming the key.
    """
    attestors = raw.get("node_attestors")
    if attestors is None:
        return KubernetesConfig()
    if not isinstance(attestors, dict):
        raise ConfigError("node_attestors must be a table")
    for name in attestors:
        if name != K8S_PSAT:
            raise ConfigError(
                f"unknown key 'node_attestors.{name}' (configurable node attestors: "
                f"{K8S_PSAT}; join_token is always on)"
            )
    try:
        clusters = parse_clusters(attestors.get(K8S_PSAT))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return KubernetesConfig(psat_clusters=tuple(clusters))


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
