"""k8s_psat: the server half against the Kubernetes API test server, over real HTTPS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attestation.kubeapi import KubeApi, KubeConnection
from attestation.node.errors import (
    AttestationError,
    AttestorUnavailableError,
    MalformedAttestationError,
)
from attestation.node.k8s_psat import (
    ClusterConfig,
    K8sPsatVerifier,
    make_attestation,
    parse_clusters,
)
from identity.selectors import Selector
from identity.spiffeid import TrustDomain
from tests.support.k8s_api import FakeKubeApi, node_object, pod_object
from tests.support.tls import LocalCa, make_ca

TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCa:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def api(ca: LocalCa) -> Iterator[FakeKubeApi]:
    with FakeKubeApi(tls=ca) as server:
        yield server


@pytest.fixture
def verifier(api: FakeKubeApi, ca: LocalCa, tmp_path: Path) -> K8sPsatVerifier:
    token_file = tmp_path / "api-token"
    token_file.write_text(api.token or "")
    kube = KubeApi(KubeConnection(api_server=api.url, token_path=token_file,
                                  ca_path=ca.ca_path))
    cluster = ClusterConfig("prod", frozenset({"sigil:sigil-agent"}))
    return K8sPsatVerifier(TD, {"prod": (cluster, kube)})


def _agent_pod(api: FakeKubeApi, node: str = "node-a", sa: str = "sigil-agent",
               name: str = "sigil-agent-x7k2p") -> dict[str, Any]:
    return api.put(pod_object(name, "sigil", node_name=node, service_account=sa,
                              labels={"app": "sigil-agent"}, owner=("DaemonSet", "sigil-agent")))


def _payload(token: str, cluster: str = "prod") -> bytes:
    return json.dumps({"cluster": cluster, "token": token}).encode()


def test_attests_with_exact_id_and_selectors(api: FakeKubeApi,
                                              verifier: K8sPsatVerifier) -> None:
    node = api.put(node_object("node-a", labels={"zone": "z1"}))
    pod = _agent_pod(api)
    token = api.issue_token(namespace="sigil", service_account="sigil-agent", pod=pod, node=node)
    result = verifier.verify(_payload(token))
    node_uid, pod_uid = node["metadata"]["uid"], pod["metadata"]["uid"]
    assert str(result.agent_id) == f"spiffe://example.org/sigil/agent/k8s_psat/prod/{node_uid}"
    assert [str(s) for s in result.selectors] == [
        "k8s_psat:cluster:prod",
        "k8s_psat:agent_ns:sigil",
        "k8s_psat:agent_sa:sigil-agent",
        "k8s_psat:agent_pod_name:sigil-agent-x7k2p",
        f"k8s_psat:agent_pod_uid:{pod_uid}",
        "k8s_psat:agent_node_name:node-a",
        f"k8s_psat:agent_node_uid:{node_uid}",
        "k8s_psat:agent_node_label:kubernetes.io/hostname:node-a",
        "k8s_psat:agent_node_label:kubernetes.io/os:linux",
        "k8s_psat:agent_node_label:zone:z1",
        "k8s_psat:agent_pod_label:app:sigil-agent",
    ]
    assert api.token_reviews[-1]["audiences"] == ["sigil-server"]
    assert result.alias is None


def test_fresh_token_from_a_new_agent_pod_keeps_the_agent_id(
        api: FakeKubeApi, verifier: K8sPsatVerifier) -> None:
    node = api.put(node_object("node-a"))
    first = _agent_pod(api, name="sigil-agent-aaaaa")
    t1 = api.issue_token(namespace="sigil", service_account="sigil-agent", pod=first, node=node)
    r1 = verifier.verify(_payload(t1))
    api.delete("pods", "sigil-agent-aaaaa", "sigil")
    second = _agent_pod(api, name="sigil-agent-bbbbb")
    t2 = api.issue_token(namespace="sigil", service_account="sigil-agent", pod=second, node=node)
    r2 = verifier.verify(_payload(t2))
    assert r2.agent_id == r1.agent_id
    assert Selector("k8s_psat", "agent_pod_name:sigil-agent-bbbbb") in r2.selectors


@pytest.mark.parametrize(("case", "reason"), [
    ("expired", "token review failed: [invalid bearer token, service account token has "
                "expired]"),
    ("audience", 'token review failed: [invalid bearer token, token audiences ["other"] is '
                 'invalid for the target audiences ["sigil-server"]]'),
    ("pod-gone", "pod sigil/sigil-agent-x7k2p of the token no longer exists"),
    ("pod-replaced", "pod sigil/sigil-agent-x7k2p of the token no longer exists"),
    ("other-node", "pod sigil/sigil-agent-x7k2p is on node node-a, the token is bound to "
                   "node node-b"),
    ("sa-not-allowed", "service account sigil:default is not allowed"),
    ("unbound", "the token is not bound to a pod (use a projected service account token)"),
    ("node-gone", "node node-a does not exist"),
])
def test_refusals(api: FakeKubeApi, verifier: K8sPsatVerifier, case: str, reason: str) -> None:
    node = api.put(node_object("node-a"))
    other = api.put(node_object("node-b"))
    pod = _agent_pod(api, sa="default" if case == "sa-not-allowed" else "sigil-agent")
    sa = "default" if case == "sa-not-allowed" else "sigil-agent"
    token = api.issue_token(
        namespace="sigil", service_account=sa,
        pod=None if case == "unbound" else pod,
        node=other if case == "other-node" else node,
        audiences=["other"] if case == "audience" else ["sigil-server"],
        expires_in=-5 if case == "expired" else 600,
    )
    if case in ("pod-gone", "pod-replaced"):
        api.delete("pods", "sigil-agent-x7k2p", "sigil")
    if case == "pod-replaced":
        _agent_pod(api)  # same name, new UID
    if case == "node-gone":
        api.delete("nodes", "node-a")
    with pytest.raises(AttestationError) as info:
        verifier.verify(_payload(token))
    assert str(info.value) == f"k8s_psat: cluster prod: {reason}"
    assert token not in str(info.value)


def test_unknown_cluster_and_malformed_payloads(verifier: K8sPsatVerifier) -> None:
    with pytest.raises(AttestationError) as info:
        verifier.verify(_payload("x", cluster="staging"))
    assert str(info.value) == "k8s_psat: cluster 'staging' is not configured"
    for bad in (b"", b"[]", b'{"cluster": "prod"}', b'{"cluster": 1, "token": "t"}',
                b"\xff", b"{" + b" " * 20000 + b"}"):
        with pytest.raises(MalformedAttestationError):
            verifier.verify(bad)


def test_unreachable_api_is_unavailable(tmp_path: Path) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("x")
    kube = KubeApi(KubeConnection(api_server="http://127.0.0.1:1", token_path=token_file))
    verifier = K8sPsatVerifier(TD, {"prod": (ClusterConfig("prod", frozenset({"a:b"})), kube)})
    with pytest.raises(AttestorUnavailableError) as info:
        verifier.verify(_payload("tok"))
    assert str(info.value).startswith("k8s_psat: cluster prod: Kubernetes API: create "
                                      "tokenreview failed:")


def test_agent_half(tmp_path: Path) -> None:
    token = tmp_path / "sigil-agent"
    token.write_text("header.payload.sig\n")
    assert make_attestation("prod", token) == (
        "k8s_psat", b'{"cluster": "prod", "token": "header.payload.sig"}')
    with pytest.raises(MalformedAttestationError, match="cannot read the service account"):
        make_attestation("prod", tmp_path / "missing")
    token.write_text("")
    with pytest.raises(MalformedAttestationError, match="is empty or too large"):
        make_attestation("prod", token)
    with pytest.raises(MalformedAttestationError, match="cluster name is required"):
        make_attestation("", token)


def test_parse_clusters() -> None:
    [(cluster, conn)] = parse_clusters({"clusters": {"prod": {
        "service_account_allow_list": ["sigil:sigil-agent"],
        "api_server": "https://10.0.0.1:6443", "token_path": "/t", "ca_path": "/ca.pem"}}})
    assert cluster == ClusterConfig("prod", frozenset({"sigil:sigil-agent"}), ("sigil-server",))
    assert (conn.api_server, conn.token_path, conn.ca_path, conn.kube_config) == (
        "https://10.0.0.1:6443", Path("/t"), Path("/ca.pem"), None)
    [(alias, _)] = parse_clusters({"clusters": {"c": {
        "allowed_service_accounts": ["a:b"], "audience": "x"}}})
    assert (alias.service_account_allow_list, alias.audience) == (frozenset({"a:b"}), ("x",))


@pytest.mark.parametrize(("table", "message"), [
    ({"clusters": {}}, "node_attestors.k8s_psat.clusters must name at least one cluster"),
    ({"other": 1}, "node_attestors.k8s_psat must be a table with only 'clusters' in it"),
    ({"clusters": {"p": {"service_account_allow_list": ["a:b"], "colour": 1}}},
     "unknown key 'node_attestors.k8s_psat.clusters.p.colour'"),
    ({"clusters": {"p": {"service_account_allow_list": ["nocolon"]}}},
     'node_attestors.k8s_psat.clusters.p.service_account_allow_list must be a non-empty '
     "list of \"namespace:name\" strings, not ['nocolon']"),
    ({"clusters": {"p": {"service_account_allow_list": ["a:b"], "api_server": "https://x"}}},
     "node_attestors.k8s_psat.clusters.p: api_server needs token_path (the API bearer token)"),
    ({"clusters": {"p": {"service_account_allow_list": ["a:b"],
                         "allowed_service_accounts": ["a:b"]}}},
     "node_attestors.k8s_psat.clusters.p: give service_account_allow_list or its alias "
     "allowed_service_accounts, not both"),
])
def test_parse_clusters_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_clusters(table)
    assert str(info.value) == message
