"""The k8s_psat node attestor (projected service-account token), both halves.

The agent runs in a pod (a DaemonSet) with a projected service-account token whose
audience is the server's (``sigil-server`` by default). It sends that token and the
name of its cluster. The server, with that cluster's API:

1. reviews the token (TokenReview, with our audience): it must be valid, unexpired
   and meant for us;
2. requires a service account on the cluster's allow list (``namespace:name``);
3. requires a pod-bound token, then finds that pod: it must exist, be the same pod
   (UID) and run under that service account;
4. requires the pod to be on the node the token is bound to (Kubernetes 1.30+
   binds projected tokens to the node too; older ones: the pod's node), and finds
   that node.

The agent ID is ``spiffe://<td>/sigil/agent/k8s_psat/<cluster>/<node-uid>``: one
per node, so a re-attestation with a fresh token (a restarted agent pod) gets the
same ID and updates the node record. Node selectors (type ``k8s_psat``):
``cluster:<name>``, ``agent_ns:``, ``agent_sa:``, ``agent_pod_name:``,
``agent_pod_uid:``, ``agent_node_name:``, ``agent_node_uid:``,
``agent_node_label:<k>:<v>``, ``agent_pod_label:<k>:<v>``.

Every refusal is a :class:`AttestationError` naming the reason (never the token),
raised before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from attestation.kubeapi import JsonObject, KubeApiError, KubeConnection, TokenReviewStatus
from attestation.node import AttestationResult
from attestation.node.errors import (
    AttestationError,
    AttestorUnavailableError,
    MalformedAttestationError,
)
from attestation.node.payload import load_json
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

NAME = "k8s_psat"
"""The attestor's name: ``AttestationData.type`` and the selector type."""

DEFAULT_AUDIENCE = "sigil-server"
DEFAULT_TOKEN_PATH = Path("/var/run/secrets/tokens/sigil-agent")
MAX_PAYLOAD_BYTES = 16 * 1024
MAX_TOKEN_BYTES = 8 * 1024
_SA_PREFIX = "system:serviceaccount:"
_EXTRA = "authentication.kubernetes.io/"


class KubeReader(Protocol):
    """The API calls the server half needs (:class:`attestation.kubeapi.KubeApi`)."""

    def token_review(self, token: str, audiences: Sequence[str]) -> TokenReviewStatus:
        """Review a token for the given audiences."""
        ...

    def get_pod(self, namespace: str, name: str) -> JsonObject | None:
        """The pod, or None."""
        ...

    def get_node(self, name: str) -> JsonObject | None:
        """The node, or None."""
        ...


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One cluster whose agents may attest with k8s_psat (server side).

    Attributes:
        name: the cluster name agents send (``[node_attestors.k8s_psat.clusters.<name>]``).
        service_account_allow_list: ``namespace:name`` of the agents' service accounts.
        audience: the audiences the tokens must carry (any one of them).
    """

    name: str
    service_account_allow_list: frozenset[str]
    audience: tuple[str, ...] = (DEFAULT_AUDIENCE,)


def agent_id(trust_domain: TrustDomain, cluster: str, node_uid: str) -> SpiffeId:
    """The agent ID of the agent on node ``node_uid`` of ``cluster``."""
    return SpiffeId.from_segments(trust_domain, "sigil", "agent", NAME, cluster, node_uid)


def implied_selectors(agent: SpiffeId) -> tuple[Selector, ...]:
    """The node selectors an agent with this ID carries whenever it attests: its
    cluster and node UID are in the ID (``.../agent/k8s_psat/<cluster>/<node-uid>``).

    Lets the server judge an entry parented by an agent that has not attested yet
    (the registration controller makes those). Empty for any other ID.
    """
    parts = agent.path.split("/")
    if len(parts) != 6 or parts[1:4] != ["sigil", "agent", NAME]:
        return ()
    return (Selector(NAME, f"cluster:{parts[4]}"), Selector(NAME, f"agent_node_uid:{parts[5]}"))


# ---- agent half -----------------------------------------------------------------------


def make_attestation(cluster: str, token_path: Path = DEFAULT_TOKEN_PATH) -> tuple[str, bytes]:
    """Build the attestation data from the projected token file.

    The token is read on every attestation: the kubelet rotates it.

    Returns:
        ``("k8s_psat", payload)``.

    Raises:
        MalformedAttestationError: no cluster name, or the token file is unreadable,
            empty or too large.
    """
    if not cluster:
        raise MalformedAttestationError("k8s_psat: the cluster name is required")
    try:
        token = token_path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise MalformedAttestationError(
            f"k8s_psat: cannot read the service account token {token_path}: {exc}"
        ) from None
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise MalformedAttestationError(
            f"k8s_psat: the service account token {token_path} is empty or too large"
        )
    return NAME, json.dumps({"cluster": cluster, "token": token}).encode()


@dataclass(frozen=True, slots=True)
class AgentAttestorConfig:
    """The agent's ``[node_attestor.k8s_psat]``.

    Attributes:
        cluster: the cluster name, as the server's config names it.
        token_path: the projected service-account token (audience ``sigil-server``).
    """

    cluster: str
    token_path: Path = DEFAULT_TOKEN_PATH


def parse_agent_config(table: object) -> AgentAttestorConfig:
    """Validate the agent's ``[node_attestor.k8s_psat]`` table.

    Raises:
        ValueError: an unknown key, or a missing or bad value, naming the key.
    """
    where = "node_attestor.k8s_psat"
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    for key in table:
        if key not in ("cluster", "token_path"):
            raise ValueError(f"unknown key '{where}.{key}'")
    cluster = table.get("cluster")
    if not isinstance(cluster, str) or not cluster:
        raise ValueError(f"{where}.cluster is required: the cluster name the server knows")
    token_path = table.get("token_path", str(DEFAULT_TOKEN_PATH))
    if not isinstance(token_path, str) or not token_path:
        raise ValueError(f"{where}.token_path must be a file path")
    return AgentAttestorConfig(cluster=cluster, token_path=Path(token_path))


# ---- server half ----------------------------------------------------------------------


def _parse_payload(payload: bytes) -> tuple[str, str]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedAttestationError(
            f"k8s_psat payload is larger than {MAX_PAYLOAD_BYTES} bytes"
        )
    doc = load_json(payload, "k8s_psat")
    if (not isinstance(doc, dict) or not isinstance(doc.get("cluster"), str)
            or not isinstance(doc.get("token"), str) or not doc["cluster"] or not doc["token"]):
        raise MalformedAttestationError(
            'k8s_psat payload must be {"cluster": "<name>", "token": "<token>"}'
        )
    return doc["cluster"], doc["token"]


def _one(extra: Mapping[str, tuple[str, ...]], key: str) -> str | None:
    values = extra.get(_EXTRA + key) or ()
    return values[0] if len(values) == 1 and values[0] else None


def _meta(obj: JsonObject, key: str) -> Any:
    return (obj.get("metadata") or {}).get(key)


def _labels(obj: JsonObject) -> dict[str, str]:
    labels = _meta(obj, "labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


@dataclass
class K8sPsatVerifier:
    """The server half: verifies payloads against the configured clusters.

    Attributes:
        trust_domain: the server's trust domain.
        clusters: the configured clusters, by name, each with its API.
    """

    trust_domain: TrustDomain
    clusters: Mapping[str, tuple[ClusterConfig, KubeReader]] = field(default_factory=dict)

    def verify(self, payload: bytes) -> AttestationResult:
        """Verify an agent's attestation data (see the module docstring).

        Raises:
            MalformedAttestationError: the payload is not k8s_psat data.
            AttestationError: refused; the message says why.
            AttestorUnavailableError: the cluster's API could not be asked.
        """
        cluster_name, token = _parse_payload(payload)
        found = self.clusters.get(cluster_name)
        if found is None:
            raise AttestationError(f"k8s_psat: cluster {cluster_name!r} is not configured")
        cluster, api = found
        try:
            return self._verify(cluster, api, token)
        except KubeApiError as exc:
            raise AttestorUnavailableError(
                f"k8s_psat: cluster {cluster.name}: {exc}"
            ) from None

    def _verify(self, cluster: ClusterConfig, api: KubeReader, token: str) -> AttestationResult:
        where = f"k8s_psat: cluster {cluster.name}"
        review = api.token_review(token, cluster.audience)
        if not review.authenticated:
            raise AttestationError(f"{where}: token review failed: {review.error or 'rejected'}")
        # An API server that ignores spec.audiences answers with its own: check again.
        if not set(review.audiences) & set(cluster.audience):
            raise AttestationError(
                f"{where}: token audiences {list(review.audiences)} do not include "
                f"{list(cluster.audience)}"
            )
        if not review.username.startswith(_SA_PREFIX):
            raise AttestationError(f"{where}: {review.username!r} is not a service account")
        account = review.username.removeprefix(_SA_PREFIX)
        namespace, _, sa_name = account.partition(":")
        if account not in cluster.service_account_allow_list:
            raise AttestationError(f"{where}: service account {account} is not allowed")
        pod_name, pod_uid = _one(review.extra, "pod-name"), _one(review.extra, "pod-uid")
        if pod_name is None or pod_uid is None:
            raise AttestationError(f"{where}: the token is not bound to a pod (use a "
                                   "projected service account token)")
        pod = api.get_pod(namespace, pod_name)
        if pod is None or _meta(pod, "uid") != pod_uid:
            raise AttestationError(f"{where}: pod {namespace}/{pod_name} of the token no "
                                   "longer exists")
        spec = pod.get("spec") or {}
        if spec.get("serviceAccountName") != sa_name:
            raise AttestationError(f"{where}: pod {namespace}/{pod_name} does not run as "
                                   f"service account {account}")
        node_name = spec.get("nodeName")
        if not isinstance(node_name, str) or not node_name:
            raise AttestationError(f"{where}: pod {namespace}/{pod_name} is not on a node")
        token_node = _one(review.extra, "node-name")
        if token_node is not None and token_node != node_name:
            raise AttestationError(f"{where}: pod {namespace}/{pod_name} is on node "
                                   f"{node_name}, the token is bound to node {token_node}")
        node = api.get_node(node_name)
        node_uid = _meta(node, "uid") if node is not None else None
        if node is None or not isinstance(node_uid, str) or not node_uid:
            raise AttestationError(f"{where}: node {node_name} does not exist")
        token_node_uid = _one(review.extra, "node-uid")
        if token_node_uid is not None and token_node_uid != node_uid:
            raise AttestationError(f"{where}: node {node_name} was replaced since the "
                                   "token was issued")
        selectors = [
            Selector(NAME, f"cluster:{cluster.name}"),
            Selector(NAME, f"agent_ns:{namespace}"),
            Selector(NAME, f"agent_sa:{sa_name}"),
            Selector(NAME, f"agent_pod_name:{pod_name}"),
            Selector(NAME, f"agent_pod_uid:{pod_uid}"),
            Selector(NAME, f"agent_node_name:{node_name}"),
            Selector(NAME, f"agent_node_uid:{node_uid}"),
        ]
        selectors += [Selector(NAME, f"agent_node_label:{k}:{v}")
                      for k, v in sorted(_labels(node).items())]
        selectors += [Selector(NAME, f"agent_pod_label:{k}:{v}")
                      for k, v in sorted(_labels(pod).items())]
        return AttestationResult(
            agent_id=agent_id(self.trust_domain, cluster.name, node_uid),
            selectors=tuple(selectors),
        )


# ---- configuration (server) -----------------------------------------------------------

_CLUSTER_KEYS = frozenset({
    "service_account_allow_list", "allowed_service_accounts", "audience",
    "api_server", "token_path", "ca_path", "kube_config",
})


def parse_clusters(table: object) -> list[tuple[ClusterConfig, KubeConnection]]:
    """Parse ``[node_attestors.k8s_psat]`` (its ``clusters.<name>`` tables).

    Returns:
        Each cluster's settings and how to reach its API (``api_server`` with
        ``token_path`` and ``ca_path``, else ``kube_config``, else in-cluster).

    Raises:
        ValueError: an unknown key or a value of the wrong type, naming the key.
    """
    where = "node_attestors.k8s_psat"
    if not isinstance(table, dict) or set(table) - {"clusters"}:
        raise ValueError(f"{where} must be a table with only 'clusters' in it")
    clusters = table.get("clusters") or {}
    if not isinstance(clusters, dict) or not clusters:
        raise ValueError(f"{where}.clusters must name at least one cluster")
    out: list[tuple[ClusterConfig, KubeConnection]] = []
    for name, options in clusters.items():
        key = f"{where}.clusters.{name}"
        if not isinstance(options, dict):
            raise ValueError(f"{key} must be a table")
        for unknown in sorted(set(options) - _CLUSTER_KEYS):
            raise ValueError(f"unknown key '{key}.{unknown}'")
        if "service_account_allow_list" in options and "allowed_service_accounts" in options:
            raise ValueError(f"{key}: give service_account_allow_list or its alias "
                             "allowed_service_accounts, not both")
        allow = options.get("service_account_allow_list",
                            options.get("allowed_service_accounts"))
        if (not isinstance(allow, list) or not allow
                or not all(isinstance(a, str) and a.count(":") == 1 and ":" not in (a[0], a[-1])
                           for a in allow)):
            raise ValueError(f'{key}.service_account_allow_list must be a non-empty list of '
                             f'"namespace:name" strings, not {allow!r}')
        audience = options.get("audience", [DEFAULT_AUDIENCE])
        if isinstance(audience, str):
            audience = [audience]
        if (not isinstance(audience, list) or not audience
                or not all(isinstance(a, str) and a for a in audience)):
            raise ValueError(f"{key}.audience must be a string or a list of strings")
        connection: dict[str, str] = {}
        for ckey in ("api_server", "token_path", "ca_path", "kube_config"):
            if ckey in options:
                if not isinstance(options[ckey], str) or not options[ckey]:
                    raise ValueError(f"{key}.{ckey} must be a non-empty string")
                connection[ckey] = options[ckey]
        if "api_server" in connection and "token_path" not in connection:
            raise ValueError(f"{key}: api_server needs token_path (the API bearer token)")
        paths = {k: Path(v) for k, v in connection.items() if k != "api_server"}
        out.append((
            ClusterConfig(name=str(name), service_account_allow_list=frozenset(allow),
                          audience=tuple(audience)),
            KubeConnection(api_server=connection.get("api_server"), **paths),
        ))
    return out
