"""x509pop and sshpop through a real sigil-server: GetAttestationChallenge and
AttestAgent over TLS, refusals with their reasons, and a datastore left untouched
by every refusal. Credentials are made at run time (tests/support/pop.py)."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

import migrations
from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from attestation.node import pop, sshpop, x509pop
from ca.datastore import Datastore
from identity.keys import generate_private_key
from identity.spiffeid import TrustDomain
from identity.x509svid import new_csr
from tests.integration.conftest import RunningServer
from tests.support.pop import (
    Key,
    new_key,
    pem,
    sha1_hex,
    ssh_host_cert,
    ssh_public,
    write_ssh_node,
    write_x509_node,
    x509_ca,
    x509_leaf,
)

TARGET = "server.sigil.invalid"
TD = TrustDomain("it.sigil.test")
NOW = dt.datetime.now(dt.UTC)
CSR = new_csr(generate_private_key())  # proofs are bound to the CSR they come with


class Credentials:
    """The run's CAs: an X.509 node CA and an SSH host CA."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.x509 = x509_ca("Fleet Node CA", now=NOW)
        self.ssh_ca = new_key("ed25519")
        (root / "node-ca.pem").write_bytes(pem(self.x509.cert))
        (root / "ssh-cas.pub").write_bytes(ssh_public(self.ssh_ca) + b"\n")


@pytest.fixture
def creds(server_root: Path) -> Credentials:
    return Credentials(server_root)


@contextlib.contextmanager
def _running(server_root: Path, *extra: str) -> Iterator[RunningServer]:
    config = server_root / "server.toml"
    config.write_text(f"""
[node_attestors.x509pop]
ca_bundle_path = "{server_root / 'node-ca.pem'}"

[node_attestors.sshpop]
cert_authorities_path = "{server_root / 'ssh-cas.pub'}"
""")
    srv = RunningServer(trust_domain=TD.name, data_dir=server_root / "data",
                        socket_path=server_root / "admin" / "admin.sock",
                        extra_args=("--config", str(config), *extra))
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


@pytest.fixture
def pop_server(server_root: Path, creds: Credentials) -> Iterator[RunningServer]:
    with _running(server_root) as srv:
        yield srv


_ROOTS: dict[str, bytes] = {}


@contextlib.contextmanager
def _stub(server: RunningServer) -> Iterator[agent_pb2_grpc.AgentStub]:
    roots = _ROOTS.get(server.address)
    if roots is None:  # one CLI run per server: each costs an interpreter start
        roots = _ROOTS[server.address] = server.cli(
            "bundle", "show", "--format", "pem").stdout.encode()
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    with grpc.secure_channel(server.address, creds,
                             options=[("grpc.ssl_target_name_override", TARGET)]) as ch:
        yield agent_pb2_grpc.AgentStub(ch)  # type: ignore[no-untyped-call]


def _challenge(server: RunningServer, attestor: str) -> bytes:
    with _stub(server) as stub:
        resp = stub.GetAttestationChallenge(
            agent_pb2.AttestationChallengeRequest(type=attestor), timeout=20)
    assert len(resp.nonce) == pop.NONCE_BYTES
    assert 0 < resp.expires_at - dt.datetime.now(dt.UTC).timestamp() <= 61
    return bytes(resp.nonce)


def _attest(server: RunningServer, attestor: str, payload: bytes) -> agent_pb2.AttestAgentResponse:
    with _stub(server) as stub:
        return stub.AttestAgent(agent_pb2.AttestAgentRequest(  # type: ignore[no-any-return]
            data=agent_pb2.AttestationData(type=attestor, payload=payload),
            csr=CSR), timeout=20)


def _x509_payload(server: RunningServer, root: Path, chain: list, key: Key,  # type: ignore[type-arg]
                  nonce: bytes | None = None) -> bytes:
    config = write_x509_node(root / "x509-node", chain, key)
    nonce = nonce if nonce is not None else _challenge(server, x509pop.NAME)
    return x509pop.make_attestation(config, trust_domain=TD, nonce=nonce, csr=CSR)[1]


def _ssh_payload(server: RunningServer, root: Path, ca_key: Key, host_key: Key,
                 **kwargs: object) -> bytes:
    cert = ssh_host_cert(ca_key, host_key, now=NOW, **kwargs)  # type: ignore[arg-type]
    config = write_ssh_node(root / "ssh-node", cert, host_key)
    return sshpop.make_attestation(config, trust_domain=TD,
                                   nonce=_challenge(server, sshpop.NAME), csr=CSR)[1]


def _snapshot(server: RunningServer) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table the attestation path could write."""
    db = sqlite3.connect(f"file:{server.data_dir / 'datastore.sqlite3'}?mode=ro", uri=True)
    try:
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                for table in ("attested_nodes", "node_selectors", "registration_entries",
                              "join_tokens", "change_events", "attestation_nonces")}
    finally:
        db.close()


def _refused(server: RunningServer, attestor: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    before = _snapshot(server)
    with pytest.raises(grpc.RpcError) as info:
        _attest(server, attestor, payload)
    assert _snapshot(server) == before, "a refused attestation wrote to the datastore"
    return info.value.code(), info.value.details() or ""


@pytest.mark.slow
def test_x509pop_attests_reattests_and_refuses(pop_server: RunningServer, creds: Credentials,
                                              server_root: Path) -> None:
    key = new_key("rsa")
    leaf = x509_leaf(creds.x509, key, now=NOW, cn="vm-1", dns=("vm-1.fleet.example",))
    first = _attest(pop_server, "x509pop", _x509_payload(pop_server, server_root, [leaf], key))
    expected = f"spiffe://{TD}/sigil/agent/x509pop/{sha1_hex(leaf)}"
    assert first.svid.spiffe_id == expected
    assert {(s.type, s.value) for s in first.node_selectors} == {
        ("x509pop", "subject:cn:vm-1"),
        ("x509pop", f"ca:fingerprint:{sha1_hex(creds.x509.cert)}"),
        ("x509pop", "san:dns:vm-1.fleet.example"),
        ("x509pop", f"serialnumber:{leaf.serial_number:x}"),
    }
    # The node keeps its certificate: it may attest again, as the same agent.
    payload = _x509_payload(pop_server, server_root, [leaf], key)
    assert _attest(pop_server, "x509pop", payload).svid.spiffe_id == expected

    other_ca = x509_ca("Fleet Node CA", now=NOW)
    cases: list[tuple[str, Callable[[], bytes], grpc.StatusCode, str]] = [
        ("replayed", lambda: payload, grpc.StatusCode.PERMISSION_DENIED,
         "x509pop: the challenge nonce was not issued for x509pop, has expired or was "
         "already used: ask for a new one"),
        ("unissued nonce",
         lambda: _x509_payload(pop_server, server_root, [leaf], key, nonce=b"\x07" * 32),
         grpc.StatusCode.PERMISSION_DENIED, "x509pop: the challenge nonce was not issued"),
        ("expired", lambda: _x509_payload(pop_server, server_root, [x509_leaf(
            creds.x509, key, now=NOW, not_after=NOW - dt.timedelta(minutes=1))], key),
         grpc.StatusCode.PERMISSION_DENIED, "x509pop: the node certificate expired at"),
        ("not yet valid", lambda: _x509_payload(pop_server, server_root, [x509_leaf(
            creds.x509, key, now=NOW, not_before=NOW + dt.timedelta(hours=1))], key),
         grpc.StatusCode.PERMISSION_DENIED, "x509pop: the node certificate is not valid before"),
        ("wrong CA", lambda: _x509_payload(pop_server, server_root,
                                           [x509_leaf(other_ca, key, now=NOW)], key),
         grpc.StatusCode.PERMISSION_DENIED,
         "x509pop: the node certificate does not chain to the configured CA bundle"),
        ("key usage", lambda: _x509_payload(pop_server, server_root, [x509_leaf(
            creds.x509, key, now=NOW, digital_signature=False)], key),
         grpc.StatusCode.PERMISSION_DENIED,
         "x509pop: the node certificate's keyUsage does not allow digitalSignature"),
        ("extended key usage", lambda: _x509_payload(pop_server, server_root, [x509_leaf(
            creds.x509, key, now=NOW, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))], key),
         grpc.StatusCode.PERMISSION_DENIED,
         "x509pop: the node certificate's extendedKeyUsage does not allow clientAuth"),
        ("truncated payload", lambda: _x509_payload(pop_server, server_root, [leaf], key)[:-9],
         grpc.StatusCode.INVALID_ARGUMENT, "x509pop payload is not JSON"),
        ("truncated signature", lambda: _truncate_signature(
            _x509_payload(pop_server, server_root, [leaf], key)),
         grpc.StatusCode.PERMISSION_DENIED,
         "x509pop: the signature over the challenge does not verify"),
    ]
    for name, build, code, message in cases:
        got_code, details = _refused(pop_server, "x509pop", build())
        assert (got_code, details[:len(message)]) == (code, message), name
        _logged(pop_server, f"reason={json.dumps(details)}")
    # Nothing of the node's key or certificate reaches the log.
    assert base64.b64encode(pem(leaf)).decode()[:40] not in pop_server.log


def _logged(server: RunningServer, text: str) -> None:
    """Wait for the server to log ``text`` (its stderr is read by a thread)."""
    deadline = time.monotonic() + 10
    while text not in server.log:
        assert time.monotonic() < deadline, f"not logged: {text}\n{server.log}"
        time.sleep(0.05)


def _truncate_signature(payload: bytes) -> bytes:
    doc = json.loads(payload)
    doc["signature"] = pop.b64encode(base64.b64decode(doc["signature"])[:-5])
    return json.dumps(doc).encode()


@pytest.mark.slow
def test_sshpop_attests_and_refuses(pop_server: RunningServer, creds: Credentials,
                                    server_root: Path) -> None:
    host_key = new_key("ec")
    payload = _ssh_payload(pop_server, server_root, creds.ssh_ca, host_key,
                           principals=("vm-2.fleet.example",), key_id="vm-2")
    result = _attest(pop_server, "sshpop", payload)
    assert result.svid.spiffe_id.startswith(f"spiffe://{TD}/sigil/agent/sshpop/")
    assert {(s.type, s.value) for s in result.node_selectors} >= {
        ("sshpop", "principal:vm-2.fleet.example"), ("sshpop", "key_id:vm-2")}

    cases: list[tuple[str, Callable[[], bytes], str]] = [
        ("replayed", lambda: payload, "sshpop: the challenge nonce was not issued for sshpop"),
        ("expired", lambda: _ssh_payload(pop_server, server_root, creds.ssh_ca, host_key,
                                         valid_before=NOW - dt.timedelta(minutes=1)),
         "sshpop: the host certificate expired at"),
        ("not yet valid", lambda: _ssh_payload(pop_server, server_root, creds.ssh_ca, host_key,
                                               valid_after=NOW + dt.timedelta(hours=1)),
         "sshpop: the host certificate is not valid before"),
        ("wrong CA", lambda: _ssh_payload(pop_server, server_root, new_key("ed25519"),
                                          host_key),
         "sshpop: the host certificate is signed by CA"),
    ]
    for name, build, message in cases:
        code, details = _refused(pop_server, "sshpop", build())
        assert (code, details[:len(message)]) == (grpc.StatusCode.PERMISSION_DENIED,
                                                  message), name
        _logged(pop_server, f"reason={json.dumps(details)}")


@pytest.mark.slow
def test_proof_bound_to_another_csr_key_is_refused(pop_server: RunningServer,
                                                   creds: Credentials,
                                                   server_root: Path) -> None:
    key = new_key()
    payload = _x509_payload(pop_server, server_root, [x509_leaf(creds.x509, key, now=NOW)],
                            key)
    # A good proof, bound to the key of CSR; this request asks an SVID for another key.
    before = _snapshot(pop_server)
    with _stub(pop_server) as stub, pytest.raises(grpc.RpcError) as info:
        stub.AttestAgent(agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type="x509pop", payload=payload),
            csr=new_csr(generate_private_key())), timeout=20)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "the proof was made for another CSR key" in (info.value.details() or "")
    # Nothing written but the nonce spent: a proof that was shown once (perhaps by
    # whoever intercepted it) cannot be tried again, not even with its own CSR.
    after = _snapshot(pop_server)
    assert after.pop("attestation_nonces") == []
    before.pop("attestation_nonces")
    assert after == before
    code, details = _refused(pop_server, "x509pop", payload)
    assert code == grpc.StatusCode.PERMISSION_DENIED, details


@pytest.mark.slow
def test_challenge_only_for_enabled_pop_attestors(pop_server: RunningServer) -> None:
    before = _snapshot(pop_server)
    for attestor in ("join_token", "k8s_psat", "tpm", ""):
        with _stub(pop_server) as stub, pytest.raises(grpc.RpcError) as info:
            stub.GetAttestationChallenge(
                agent_pb2.AttestationChallengeRequest(type=attestor), timeout=20)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, attestor
        assert info.value.details() == (
            f"node attestor {attestor!r} is not enabled or takes no challenge")
    assert _snapshot(pop_server) == before


@pytest.mark.slow
def test_challenge_and_answer_on_different_worker_processes(
        server_root: Path, creds: Credentials) -> None:
    """Each call below is a new connection, which SO_REUSEPORT spreads over the
    three processes: a nonce issued by one is answered at another, once."""
    with _running(server_root, "--worker-processes", "3") as srv:
        deadline = time.monotonic() + 30
        while srv.log.count("worker listening") < 2:
            assert time.monotonic() < deadline, srv.log
            time.sleep(0.1)
        key = new_key()
        leaf = x509_leaf(creds.x509, key, now=NOW)
        payloads = [_x509_payload(srv, server_root, [leaf], key) for _ in range(6)]
        for payload in payloads:
            assert _attest(srv, "x509pop", payload).svid.spiffe_id.endswith(sha1_hex(leaf))
        for payload in payloads:
            code, details = _refused(srv, "x509pop", payload)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "already used" in details


def test_nonces_are_single_use_across_servers(tmp_path: Path) -> None:
    """Two datastores on one database (two servers, or two worker processes): a
    nonce one issued is good once, at either; for its attestor only; not after expiry."""
    url = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(url)
    with Datastore(url) as a, Datastore(url) as b:
        nonce, expires = pop.issue_nonce(a, attestor="x509pop", now=NOW)
        assert expires == NOW + pop.NONCE_TTL
        assert not b.take_attestation_nonce(pop.nonce_digest(nonce), attestor="sshpop", now=NOW)
        assert b.take_attestation_nonce(pop.nonce_digest(nonce), attestor="x509pop", now=NOW)
        assert not a.take_attestation_nonce(pop.nonce_digest(nonce), attestor="x509pop",
                                            now=NOW)
        late, _ = pop.issue_nonce(a, attestor="sshpop", now=NOW)
        after = NOW + pop.NONCE_TTL + dt.timedelta(seconds=1)
        assert not b.take_attestation_nonce(pop.nonce_digest(late), attestor="sshpop", now=after)
        # Issuing drops what expired unanswered.
        pop.issue_nonce(b, attestor="sshpop", now=after)
        db = sqlite3.connect(tmp_path / "ds.sqlite3")
        try:
            rows = db.execute("SELECT attestor FROM attestation_nonces").fetchall()
        finally:
            db.close()
        assert rows == [("sshpop",)]

