"""The SPIFFE Broker API over TCP with mutual TLS (agent/workload_api/brokertls.py).

Real TCP, real grpcio server credentials, real TLS handshakes with SVIDs made by a
test CA. The agent side presents its agent SVID; a broker presents its X.509-SVID,
whose SPIFFE ID must be in ``authorized``. The broker's side is Python's ``ssl``
under a grpcio channel (tests/support/broker_tls.py), as grpcio's own TLS client
wants a host name an SVID does not have.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from agent.workload_api.broker import PID_REFERENCE, BrokerApiServer
from api.protos import broker_pb2 as bpb
from identity.bundle import Bundle
from identity.keys import generate_private_key, private_key_to_pem
from identity.revocation import X509_SERIAL, X509_SPIFFE_ID, Revocation, serial_text
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid, certificates_to_pem
from tests.integration.test_broker_api import APP_ID, BROKER_ID, EnvAttestor
from tests.integration.workload_api_harness import AGENT_ID, TD, Harness, TestCA, entry
from tests.support.broker_tls import BrokerCredentials, TlsTunnel, handshake

PID_URL = "type.googleapis.com/" + PID_REFERENCE
HEADER = (("broker.spiffe.io", "true"),)


@dataclass
class AgentTls:
    """What the endpoint reads at each handshake; tests swap them to rotate."""

    svid: X509Svid
    bundle: Bundle


class Setup:
    def __init__(self, harness: Harness, tls: AgentTls, server: BrokerApiServer,
                 files: Path) -> None:
        self.harness = harness
        self.tls = tls
        self.server = server
        self.files = files
        self.children: list[subprocess.Popen[bytes]] = []
        self.address = ("127.0.0.1", server.tcp_port or 0)

    def workload(self, name: str = "app") -> int:
        proc = subprocess.Popen(["sleep", "60"], env=dict(os.environ, SIGIL_TEST_WORKLOAD=name))
        self.children.append(proc)
        return proc.pid

    def creds(self, svid: X509Svid | None, *, name: str = "broker",
              trust: tuple[x509.Certificate, ...] | None = None,
              server_id: str = str(AGENT_ID)) -> BrokerCredentials:
        """PEM files for a broker presenting ``svid`` (None: no certificate)."""
        bundle = self.files / f"{name}-bundle.pem"
        bundle.write_bytes(certificates_to_pem(trust or self.tls.bundle.x509_authorities))
        if svid is None:
            return BrokerCredentials(bundle=bundle, server_id=server_id)
        chain, key = self.files / f"{name}.pem", self.files / f"{name}.key"
        chain.write_bytes(svid.chain_pem())
        key.write_bytes(svid.key_pem())
        return BrokerCredentials(bundle=bundle, server_id=server_id, chain=chain, key=key)

    def subscribe(self, creds: BrokerCredentials, pid: int, *, header: bool = True,
                  ) -> tuple[str, list[str]]:
        """One SubscribeToX509SVID: ("OK", SPIFFE IDs) or (status code, [details])."""
        reference = bpb.WorkloadReference()
        reference.reference.type_url = PID_URL
        reference.reference.value = bpb.WorkloadPIDReference(pid=pid).SerializeToString()
        with TlsTunnel(self.address, creds) as tunnel, \
                grpc.insecure_channel(tunnel.target) as channel:
            call = channel.unary_stream(
                "/spiffe.broker.API/SubscribeToX509SVID",
                request_serializer=bpb.SubscribeToX509SVIDRequest.SerializeToString,
                response_deserializer=bpb.SubscribeToX509SVIDResponse.FromString)
            try:
                for message in call(bpb.SubscribeToX509SVIDRequest(reference=reference),
                                    metadata=HEADER if header else (), timeout=20):
                    return "OK", [s.spiffe_id for s in message.svids]
            except grpc.RpcError as exc:
                return exc.code().name, [exc.details() or "", *tunnel.errors]
        return "EMPTY", []

    def in_use(self) -> frozenset[str]:
        return self.harness.call(self.harness.cache.in_use)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    harness = Harness(attestors=[EnvAttestor()])
    harness.set_state([
        entry("e-broker", BROKER_ID, "test:workload:broker"),
        entry("e-app", APP_ID, "test:workload:app"),
    ])
    tls = AgentTls(harness.ca.svid(AGENT_ID), harness.ca.bundle())
    server = BrokerApiServer(
        listen_address=("127.0.0.1", 0), cache=harness.cache, attestors=[EnvAttestor()],
        authorized=[SpiffeId.parse(BROKER_ID)], agent_svid=lambda: tls.svid,
        bundle=lambda: tls.bundle, first_response_timeout=2.0)
    harness.run(server.start())
    s = Setup(harness, tls, server, tmp_path)
    try:
        yield s
    finally:
        for child in s.children:
            child.kill()
            child.wait()
        harness.run(server.stop(grace=0.1))
        harness.close()


def test_authorized_broker_gets_the_referenced_workloads_svid_over_tcp(setup: Setup) -> None:
    broker = setup.creds(setup.harness.ca.svid(BROKER_ID))
    assert handshake(setup.address, broker) == "ok"
    assert setup.subscribe(broker, setup.workload("app")) == ("OK", [APP_ID])


def test_the_agent_presents_its_own_svid(setup: Setup) -> None:
    broker = setup.creds(setup.harness.ca.svid(BROKER_ID))
    with broker.connect(setup.address) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der == setup.tls.svid.leaf.public_bytes(Encoding.DER)
    # A broker that expects another provider refuses it (Broker Endpoint section 5).
    other = setup.creds(setup.harness.ca.svid(BROKER_ID), name="b2",
                        server_id="spiffe://example.org/sigil/agent/other")
    assert "ConnectionRefusedError" in handshake(setup.address, other)


def test_missing_header_is_refused_over_tcp(setup: Setup) -> None:
    broker = setup.creds(setup.harness.ca.svid(BROKER_ID))
    code, details = setup.subscribe(broker, setup.workload("app"), header=False)
    assert code == "INVALID_ARGUMENT"
    assert "header" in details[0]
    assert setup.in_use() == frozenset()


def test_broker_id_not_on_the_list_is_refused(setup: Setup) -> None:
    # A valid SVID of the trust domain, and even one with an entry: not listed.
    other = setup.creds(setup.harness.ca.svid("spiffe://example.org/other"), name="other")
    assert handshake(setup.address, other) == "ok"  # TLS is fine; authorization is not
    code, details = setup.subscribe(other, setup.workload("app"))
    assert (code, details[0]) == ("PERMISSION_DENIED", "caller is not an authorized broker")
    # Nothing was done for the referenced workload: no SVID of it is held for it.
    assert setup.in_use() == frozenset()
    # The endpoint still serves an authorized broker.
    broker = setup.creds(setup.harness.ca.svid(BROKER_ID))
    assert setup.subscribe(broker, setup.workload("app")) == ("OK", [APP_ID])


def _foreign_svid() -> X509Svid:
    return TestCA(TrustDomain("other.org")).svid("spiffe://other.org/broker")


def _expired_svid(ca: TestCA) -> X509Svid:
    return ca.svid(BROKER_ID, ttl=dt.timedelta(seconds=-5))


@pytest.mark.parametrize("case", ["no certificate", "another trust domain",
                                  "another CA of this trust domain", "expired"])
def test_bad_client_certificates_fail_the_handshake(setup: Setup, case: str) -> None:
    ca = setup.harness.ca
    svid = {"no certificate": None,
            "another trust domain": _foreign_svid(),
            "another CA of this trust domain": TestCA().svid(BROKER_ID),
            "expired": _expired_svid(ca)}[case]
    bad = setup.creds(svid, name="bad")
    outcome = handshake(setup.address, bad)
    assert outcome != "ok"
    assert "SSLError" in outcome or "ConnectionResetError" in outcome or outcome == "closed"
    # Through grpc: no RPC runs at all (the connection never carries HTTP/2).
    code, _details = setup.subscribe(bad, setup.workload("app"))
    assert code == "UNAVAILABLE"
    assert setup.in_use() == frozenset()
    # Nothing changed for an authorized broker.
    good = setup.creds(ca.svid(BROKER_ID))
    assert setup.subscribe(good, setup.workload("app")) == ("OK", [APP_ID])


@pytest.mark.parametrize("kind", [X509_SERIAL, X509_SPIFFE_ID])
def test_a_revoked_broker_certificate_is_unauthenticated(setup: Setup, kind: str) -> None:
    """Over TCP the certificate is the broker's identity: once the server revokes it
    (by serial, or every SVID of its ID issued until now) and the agent has synced
    the revocation, a stolen copy stops working, not when it expires."""
    svid = setup.harness.ca.svid(BROKER_ID)
    broker = setup.creds(svid)
    assert setup.subscribe(broker, setup.workload("app")) == ("OK", [APP_ID])
    now = int(dt.datetime.now(dt.UTC).timestamp())
    revocation = (Revocation(id=1, kind=X509_SERIAL, value=serial_text(svid.leaf.serial_number))
                  if kind == X509_SERIAL else
                  Revocation(id=1, kind=X509_SPIFFE_ID, value=BROKER_ID, not_before_max=now))
    setup.harness.call(lambda: setup.harness.cache.apply_revocations([revocation], full=True))
    code, details = setup.subscribe(broker, setup.workload("app"))
    assert (code, details[0]) == ("UNAUTHENTICATED", "client certificate is revoked")
    # A new SVID of the same broker, issued after the revocation by serial, works.
    if kind == X509_SERIAL:
        fresh = setup.creds(setup.harness.ca.svid(BROKER_ID), name="fresh")
        assert setup.subscribe(fresh, setup.workload("app")) == ("OK", [APP_ID])


def test_a_certificate_that_is_no_svid_is_unauthenticated(setup: Setup) -> None:
    # Chains to the bundle (so the handshake passes) but has no SPIFFE ID: grpcio
    # accepts it, the X.509-SVID check after it does not.
    ca = setup.harness.ca
    key = generate_private_key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name.from_rfc4514_string("CN=not-an-svid"))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("broker.test")]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    files = setup.files
    (files / "nosvid.pem").write_bytes(certificates_to_pem([cert]))
    (files / "nosvid.key").write_bytes(private_key_to_pem(key))
    creds = BrokerCredentials(bundle=setup.creds(None).bundle, server_id=str(AGENT_ID),
                              chain=files / "nosvid.pem", key=files / "nosvid.key")
    code, details = setup.subscribe(creds, setup.workload("app"))
    assert code == "UNAUTHENTICATED"
    assert "not a valid X.509-SVID" in details[0]
    assert setup.in_use() == frozenset()


def test_agent_svid_and_bundle_rotation_apply_without_restart(setup: Setup) -> None:
    ca = setup.harness.ca
    broker = setup.creds(ca.svid(BROKER_ID))
    assert setup.subscribe(broker, setup.workload("app")) == ("OK", [APP_ID])
    # The agent SVID renews: new connections see the new one.
    renewed = ca.svid(AGENT_ID)
    setup.harness.call(lambda: setattr(setup.tls, "svid", renewed))
    with broker.connect(setup.address) as tls:
        assert tls.getpeercert(binary_form=True) == renewed.leaf.public_bytes(Encoding.DER)
    # A CA rotation: the new authority joins the bundle, then the old one leaves.
    new_ca = TestCA()
    both = (ca.cert, new_ca.cert)
    new_broker = setup.creds(new_ca.svid(BROKER_ID), name="new", trust=both)
    assert handshake(setup.address, new_broker) != "ok"  # not in the bundle yet
    setup.harness.call(lambda: setattr(
        setup.tls, "bundle", Bundle(trust_domain=TD, x509_authorities=both)))
    assert setup.subscribe(new_broker, setup.workload("app")) == ("OK", [APP_ID])
    new_agent = new_ca.svid(AGENT_ID)
    setup.harness.call(lambda: (setattr(setup.tls, "svid", new_agent), setattr(
        setup.tls, "bundle", Bundle(trust_domain=TD, x509_authorities=(new_ca.cert,)))))
    old_broker = setup.creds(ca.svid(BROKER_ID), name="old", trust=both)
    assert handshake(setup.address, old_broker) != "ok"
    assert setup.subscribe(old_broker, setup.workload("app"))[0] == "UNAVAILABLE"
    assert setup.subscribe(new_broker, setup.workload("app")) == ("OK", [APP_ID])

