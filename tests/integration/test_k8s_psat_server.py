"""k8s_psat through a real sigil-server: AttestAgent over TLS, the Kubernetes API test server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from attestation.node.k8s_psat import make_attestation
from identity.keys import generate_private_key
from identity.x509svid import new_csr
from tests.integration.conftest import RunningServer
from tests.support.k8s_api import FakeKubeApi, node_object, pod_object
from tests.support.tls import LocalCa, make_ca

TARGET = "server.sigil.invalid"


@pytest.fixture
def kube(server_root: Path) -> Iterator[tuple[FakeKubeApi, LocalCa]]:
    ca = make_ca(server_root / "kube-ca")
    with FakeKubeApi(tls=ca) as api:
        yield api, ca


@pytest.fixture
def psat_server(server_root: Path, kube: tuple[FakeKubeApi, LocalCa]) -> Iterator[RunningServer]:
    api, ca = kube
    (server_root / "api-token").write_text(api.token or "")
    config = server_root / "server.toml"
    config.write_text(f"""
[node_attestors.k8s_psat.clusters.prod]
service_account_allow_list = ["sigil:sigil-agent"]
api_server = "{api.url}"
token_path = "{server_root / 'api-token'}"
ca_path = "{ca.ca_path}"
""")
    srv = RunningServer(trust_domain="it.sigil.test", data_dir=server_root / "data",
                        socket_path=server_root / "admin" / "admin.sock",
                        extra_args=("--config", str(config)))
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def _attest(server: RunningServer, token_file: Path, cluster: str = "prod"
            ) -> agent_pb2.AttestAgentResponse:
    roots = server.cli("bundle", "show", "--format", "pem").stdout.encode()
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    kind, payload = make_attestation(cluster, token_file)
    with grpc.secure_channel(server.address, creds,
                             options=[("grpc.ssl_target_name_override", TARGET)]) as ch:
        return agent_pb2_grpc.AgentStub(ch).AttestAgent(agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type=kind, payload=payload),
            csr=new_csr(generate_private_key())), timeout=20)


def _agents(server: RunningServer) -> list[dict[str, object]]:
    proc = server.cli("agent", "list", "--output", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    return doc["agents"]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_attest_reattest_and_refuse(psat_server: RunningServer,
                                    kube: tuple[FakeKubeApi, LocalCa], tmp_path: Path) -> None:
    api, _ = kube
    node = api.put(node_object("node-a"))
    pod = api.put(pod_object("sigil-agent-1", "sigil", node_name="node-a",
                             service_account="sigil-agent"))
    token_file = tmp_path / "token"
    token_file.write_text(api.issue_token(namespace="sigil", service_account="sigil-agent",
                                          pod=pod, node=node))
    first = _attest(psat_server, token_file)
    expected_id = f"spiffe://it.sigil.test/sigil/agent/k8s_psat/prod/{node['metadata']['uid']}"
    assert first.svid.spiffe_id == expected_id
    assert ("k8s_psat", "agent_pod_name:sigil-agent-1") in [
        (s.type, s.value) for s in first.node_selectors]

    # A new agent pod on the same node, with a fresh token: same agent, record updated.
    api.delete("pods", "sigil-agent-1", "sigil")
    pod2 = api.put(pod_object("sigil-agent-2", "sigil", node_name="node-a",
                              service_account="sigil-agent"))
    token_file.write_text(api.issue_token(namespace="sigil", service_account="sigil-agent",
                                          pod=pod2, node=node))
    second = _attest(psat_server, token_file)
    assert second.svid.spiffe_id == expected_id
    [agent] = _agents(psat_server)
    selectors = {f"{s['type']}:{s['value']}" for s in agent["selectors"]}  # type: ignore[attr-defined]
    assert "k8s_psat:agent_pod_name:sigil-agent-2" in selectors
    assert "k8s_psat:agent_pod_name:sigil-agent-1" not in selectors

    # Refusals: PermissionDenied with the reason, nothing written.
    stale = api.issue_token(namespace="sigil", service_account="sigil-agent", pod=pod,
                            node=node)  # bound to the deleted pod
    token_file.write_text(stale)
    with pytest.raises(grpc.RpcError) as info:
        _attest(psat_server, token_file)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == (
        "k8s_psat: cluster prod: pod sigil/sigil-agent-1 of the token no longer exists")
    with pytest.raises(grpc.RpcError) as info:
        _attest(psat_server, token_file, cluster="staging")
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.PERMISSION_DENIED, "k8s_psat: cluster 'staging' is not configured")
    assert len(_agents(psat_server)) == 1
    assert stale not in psat_server.log
