"""The agent API over real TLS: attestation, mTLS authentication, sync and signing."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from attestation.node.join_token import make_attestation
from identity.keys import generate_private_key, private_key_to_pem
from identity.x509svid import certificates_to_pem, load_certificates_pem, new_csr
from tests.integration.conftest import RunningServer

TARGET = "server.sigil.invalid"


def _json(proc: subprocess.CompletedProcess[str]) -> object:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@dataclass
class Agent:
    """An attested agent: its ID, key, SVID chain and an mTLS stub."""

    agent_id: str
    key: ec.EllipticCurvePrivateKey
    chain_der: list[bytes]
    stub: agent_pb2_grpc.AgentStub
    channel: grpc.Channel


def _roots(server: RunningServer) -> bytes:
    proc = server.cli("bundle", "show", "--format", "pem")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.encode()


def _channel(server: RunningServer, *, key: object = None, chain: list[bytes] | None = None
             ) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=_roots(server),
        private_key=private_key_to_pem(key) if key is not None else None,  # type: ignore[arg-type]
        certificate_chain=certificates_to_pem(
            x509.load_der_x509_certificate(d) for d in chain) if chain else None,
    )
    return grpc.secure_channel(server.address, creds,
                               options=[("grpc.ssl_target_name_override", TARGET)])


def _token(server: RunningServer, *extra: str) -> dict[str, str]:
    return _json(server.cli("token", "generate", "--output", "json", *extra))  # type: ignore[return-value]


def _attest(server: RunningServer, token: str) -> Agent:
    key = generate_private_key()
    with _channel(server) as ch:
        resp = agent_pb2_grpc.AgentStub(ch).AttestAgent(_attest_request(token, key), timeout=10)
    channel = _channel(server, key=key, chain=list(resp.svid.cert_chain))
    return Agent(resp.svid.spiffe_id, key, list(resp.svid.cert_chain),  # type: ignore[arg-type]
                 agent_pb2_grpc.AgentStub(channel), channel)


def _attest_request(token: str, key: object, csr: bytes | None = None
                    ) -> agent_pb2.AttestAgentRequest:
    kind, payload = make_attestation(token)
    return agent_pb2.AttestAgentRequest(
        data=agent_pb2.AttestationData(type=kind, payload=payload),
        csr=csr if csr is not None else new_csr(key),  # type: ignore[arg-type]
    )


@pytest.fixture
def agent(sigil_server: RunningServer) -> Iterator[Agent]:
    a = _attest(sigil_server, _token(sigil_server)["token"])
    yield a
    a.channel.close()


def _entry(server: RunningServer, spiffe_id: str, parent: str, *args: str) -> dict[str, object]:
    return _json(server.cli("entry", "create", "--spiffe-id", spiffe_id, "--parent-id", parent,
                            "--output", "json", *args))  # type: ignore[return-value]


# ---- attestation --------------------------------------------------------------------


def test_attest_then_reuse_is_denied(sigil_server: RunningServer) -> None:
    tok = _token(sigil_server)
    key = generate_private_key()
    with _channel(sigil_server) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        resp = stub.AttestAgent(_attest_request(tok["token"], key), timeout=10)
        assert resp.svid.spiffe_id == tok["agent_id"]
        leaf = x509.load_der_x509_certificate(resp.svid.cert_chain[0])
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [tok["agent_id"]]
        token_id = tok["token"].split(".")[0]
        assert {(s.type, s.value) for s in resp.node_selectors} == {
            ("join_token", token_id), ("spiffe_id", tok["agent_id"])}
        assert resp.bundle.trust_domain == sigil_server.trust_domain
        with pytest.raises(grpc.RpcError) as err:
            stub.AttestAgent(_attest_request(tok["token"], key), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "already used" in (err.value.details() or "")
    assert tok["token"] not in sigil_server.log
    assert tok["token"].split(".")[1] not in sigil_server.log


def test_expired_token_is_denied(sigil_server: RunningServer) -> None:
    # A 1-second token, then wait for the server's clock to pass it: the only sleep
    # here, as the server process's clock cannot be injected from outside.
    import time

    tok = _token(sigil_server, "--ttl", "1")
    time.sleep(2.1)
    with _channel(sigil_server) as ch, pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.AgentStub(ch).AttestAgent(
            _attest_request(tok["token"], generate_private_key()), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "expired" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("csr", "code"),
    [
        (b"garbage", grpc.StatusCode.INVALID_ARGUMENT),
        (b"", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_csr_does_not_consume_token(
    sigil_server: RunningServer, csr: bytes, code: grpc.StatusCode
) -> None:
    tok = _token(sigil_server)
    with _channel(sigil_server) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.AttestAgent(_attest_request(tok["token"], None, csr=csr), timeout=10)
        assert err.value.code() == code
        # The token is still good.
        stub.AttestAgent(_attest_request(tok["token"], generate_private_key()), timeout=10)


@pytest.mark.parametrize(
    ("kind", "payload", "code"),
    [
        ("k8s_psat", b"{}", grpc.StatusCode.PERMISSION_DENIED),
        ("", b"", grpc.StatusCode.INVALID_ARGUMENT),
        ("join_token", b"not json", grpc.StatusCode.INVALID_ARGUMENT),
        ("join_token", b'{"token": "0123456789abcdef.nope"}', grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_bad_attestation_data(
    sigil_server: RunningServer, kind: str, payload: bytes, code: grpc.StatusCode
) -> None:
    req = agent_pb2.AttestAgentRequest(
        data=agent_pb2.AttestationData(type=kind, payload=payload),
        csr=new_csr(generate_private_key()))
    with _channel(sigil_server) as ch, pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.AgentStub(ch).AttestAgent(req, timeout=10)
    assert err.value.code() == code


def test_server_certificate_carries_ca_in_chain(sigil_server: RunningServer) -> None:
    # An agent bootstrapping with --insecure-bootstrap reads the root from the handshake.
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", sigil_server.address, "-servername", TARGET,
         "-showcerts", "-alpn", "h2"],
        input=b"", capture_output=True, timeout=30,
    )
    # s_client also prints what the server sent after the handshake: the relayed
    # gRPC server's HTTP/2 SETTINGS frame, binary. The PEM blocks are ASCII.
    out = proc.stdout.decode("utf-8", errors="replace")
    chain = load_certificates_pem(proc.stdout)
    assert len(chain) == 2, out + proc.stderr.decode("utf-8", errors="replace")
    leaf, ca = chain
    assert ca == x509.load_pem_x509_certificate(_roots(sigil_server))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [TARGET]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{sigil_server.trust_domain}/sigil/server"]


# ---- authenticated calls ------------------------------------------------------------


def test_no_client_certificate_is_refused(sigil_server: RunningServer) -> None:
    with _channel(sigil_server) as ch, pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.AgentStub(ch).SyncAuthorized(agent_pb2.SyncAuthorizedRequest(),
                                                    timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_api_on_tcp_needs_an_admin_svid(sigil_server: RunningServer) -> None:
    # Only workloads with an admin entry's SVID and an [admin] grant may call it here
    # (tests/integration/test_scoped_admins.py); a caller without a certificate cannot.
    with _channel(sigil_server) as ch, pytest.raises(grpc.RpcError) as err:
        admin_pb2_grpc.AdminStub(ch).CreateJoinToken(admin_pb2.CreateJoinTokenRequest(),
                                                     timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == "the admin API over TLS needs an admin X.509-SVID"


def test_sync_returns_exactly_authorized_entries(
    sigil_server: RunningServer, agent: Agent
) -> None:
    td = sigil_server.trust_domain
    other = _token(sigil_server)["agent_id"]
    mine = _entry(sigil_server, f"spiffe://{td}/web", agent.agent_id, "--selector", "unix:uid:1")
    nested = _entry(sigil_server, f"spiffe://{td}/web/child", f"spiffe://{td}/web",
                    "--selector", "unix:uid:2")
    _entry(sigil_server, f"spiffe://{td}/db", other, "--selector", "unix:uid:1")
    resp = agent.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(), timeout=10)
    assert sorted(e.id for e in resp.entries) == sorted([mine["id"], nested["id"]])
    assert td in resp.bundles
    assert resp.revision >= 3


def test_sync_via_alias(sigil_server: RunningServer) -> None:
    td = sigil_server.trust_domain
    alias = f"spiffe://{td}/node/web-1"
    a = _attest(sigil_server, _token(sigil_server, "--spiffe-id", alias)["token"])
    b = _attest(sigil_server, _token(sigil_server)["token"])
    try:
        via_alias = _entry(sigil_server, f"spiffe://{td}/svc", alias, "--selector", "unix:uid:5")
        ids_a = [e.id for e in a.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(),
                                                     timeout=10).entries]
        ids_b = [e.id for e in b.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(),
                                                     timeout=10).entries]
        assert ids_a == [via_alias["id"]]
        assert ids_b == []
        # The alias node entry exists, parented to the server.
        shown = _json(sigil_server.cli("entry", "show", "--spiffe-id", alias, "--output", "json"))
        assert [e["parent_id"] for e in shown["entries"]] == [f"spiffe://{td}/sigil/server"]  # type: ignore[attr-defined,index]
    finally:
        a.channel.close()
        b.channel.close()


def _csr_with_sans(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil")]))
           .add_extension(x509.SubjectAlternativeName([
               x509.UniformResourceIdentifier("spiffe://evil.test/admin"),
               x509.DNSName("evil.example")]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(Encoding.DER)


def test_batch_new_x509_svid(sigil_server: RunningServer, agent: Agent) -> None:
    td = sigil_server.trust_domain
    mine = _entry(sigil_server, f"spiffe://{td}/web", agent.agent_id, "--selector", "unix:uid:1",
                  "--dns-name", "web.example.test", "--x509-svid-ttl", "600")
    theirs = _entry(sigil_server, f"spiffe://{td}/db", _token(sigil_server)["agent_id"],
                    "--selector", "unix:uid:1")
    key = generate_private_key()
    resp = agent.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
        agent_pb2.NewX509SVIDParams(entry_id=mine["id"], csr=_csr_with_sans(key)),  # type: ignore[arg-type]
        agent_pb2.NewX509SVIDParams(entry_id=theirs["id"], csr=new_csr(key)),  # type: ignore[arg-type]
        agent_pb2.NewX509SVIDParams(entry_id=mine["id"], csr=b"junk"),  # type: ignore[arg-type]
    ]), timeout=10)
    ok, denied, bad = resp.results
    assert ok.status.code == 0
    leaf = x509.load_der_x509_certificate(ok.svid.cert_chain[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{td}/web"]
    assert san.get_values_for_type(x509.DNSName) == ["web.example.test"]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 600 <= life.total_seconds() <= 620
    assert denied.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert not denied.svid.cert_chain
    assert bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # openssl agrees the chain verifies against the bundle.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ca.pem").write_bytes(_roots(sigil_server))
        (Path(tmp) / "leaf.der").write_bytes(ok.svid.cert_chain[0])
        proc = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", f"{tmp}/leaf.der",
                               "-out", f"{tmp}/leaf.pem"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run(["openssl", "verify", "-CAfile", f"{tmp}/ca.pem",
                               f"{tmp}/leaf.pem"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_batch_size_is_bounded(sigil_server: RunningServer, agent: Agent) -> None:
    params = [agent_pb2.NewX509SVIDParams(entry_id="x", csr=b"")] * 501
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=params), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("audience", "code"),
    [
        (["svc-a"], None),
        ([], grpc.StatusCode.INVALID_ARGUMENT),
        ([""], grpc.StatusCode.INVALID_ARGUMENT),
        (["x" * 257], grpc.StatusCode.INVALID_ARGUMENT),
        ([f"a{i}" for i in range(33)], grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_new_jwt_svid_audience(
    sigil_server: RunningServer, agent: Agent, audience: list[str],
    code: grpc.StatusCode | None,
) -> None:
    td = sigil_server.trust_domain
    e = _entry(sigil_server, f"spiffe://{td}/web", agent.agent_id, "--selector", "unix:uid:1")
    req = agent_pb2.NewJWTSVIDRequest(entry_id=e["id"], audience=audience)  # type: ignore[arg-type]
    if code is None:
        resp = agent.stub.NewJWTSVID(req, timeout=10)
        claims = jwt.decode(resp.token, options={"verify_signature": False})
        assert claims["sub"] == f"spiffe://{td}/web"
        assert claims["aud"] in (audience, audience[0])
        assert resp.expires_at - resp.issued_at == 300
    else:
        with pytest.raises(grpc.RpcError) as err:
            agent.stub.NewJWTSVID(req, timeout=10)
        assert err.value.code() == code


def test_new_jwt_svid_for_unauthorized_entry(sigil_server: RunningServer, agent: Agent) -> None:
    td = sigil_server.trust_domain
    e = _entry(sigil_server, f"spiffe://{td}/db", _token(sigil_server)["agent_id"],
               "--selector", "unix:uid:1")
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id=e["id"], audience=["a"]),  # type: ignore[arg-type]
                              timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_renew_agent(sigil_server: RunningServer, agent: Agent) -> None:
    key = generate_private_key()
    resp = agent.stub.RenewAgent(agent_pb2.RenewAgentRequest(csr=new_csr(key)), timeout=10)
    assert resp.svid.spiffe_id == agent.agent_id
    # The old SVID keeps working until the new one is used...
    agent.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(), timeout=10)
    with _channel(sigil_server, key=key, chain=list(resp.svid.cert_chain)) as ch:
        agent_pb2_grpc.AgentStub(ch).SyncAuthorized(agent_pb2.SyncAuthorizedRequest(),
                                                     timeout=10)
    # ...then only the new one does.
    with _channel(sigil_server, key=agent.key, chain=agent.chain_der) as ch, pytest.raises(
        grpc.RpcError
    ) as err:
        agent_pb2_grpc.AgentStub(ch).SyncAuthorized(agent_pb2.SyncAuthorizedRequest(),
                                                     timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
