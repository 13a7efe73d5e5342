"""Malformed or hostile AttestAgent payloads get the attestor's own status
(INVALID_ARGUMENT for what cannot be parsed, PERMISSION_DENIED for a refused
certificate), never INTERNAL: every parsing path of network input raises the
attestor's error. The servicer runs in-process on SQLite with the real x509pop,
sshpop, k8s_psat and join_token halves."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from api.protos.sigil.agent.v1 import agent_pb2
from attestation.node import join_token, k8s_psat, sshpop, x509pop
from ca.api.agent import AgentServicer
from ca.api.deps import ApiDeps
from ca.authority.setup import build_authority
from ca.config.server import load_config
from ca.datastore import Datastore
from ca.datastore import models as m
from ca.keys import MemoryKeyManager
from ca.ratelimit import RateLimit, RateLimiter
from identity.clock import FakeClock
from identity.keys import generate_private_key
from identity.spiffeid import TrustDomain
from identity.x509svid import new_csr
from tests.integration.test_attest_agent_datastore import Aborted, _Context
from tests.support.pop import new_key, pem, ssh_public, x509_ca, x509_leaf

TD = TrustDomain("bad.sigil.test")
NOW = dt.datetime.now(dt.UTC)
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
DEEP = b"[" * 1024  # json.loads raises RecursionError, not ValueError (join_token: 1024 at most)


class Harness:
    def __init__(self, tmp_path: Path, url: str) -> None:
        conf = tmp_path / "server.toml"
        (tmp_path / "data").mkdir()
        conf.write_text(f'trust_domain = "{TD.name}"\ndata_dir = "{tmp_path / "data"}"\n')
        self.config = load_config(conf, env={}, overrides={"database_url": url})
        self.clock = FakeClock(NOW)
        self.datastore = Datastore(url)
        authority = build_authority(self.config, self.datastore, self.clock,
                                    key_manager=MemoryKeyManager())
        self.ca = x509_ca("Node CA", now=NOW)
        (tmp_path / "node-ca.pem").write_bytes(pem(self.ca.cert))
        (tmp_path / "ssh-cas.pub").write_bytes(ssh_public(new_key("ed25519")) + b"\n")
        x509_config = x509pop.parse_server_config({"ca_bundle_path": str(tmp_path / "node-ca.pem")})
        ssh_config = sshpop.parse_server_config(
            {"cert_authorities_path": str(tmp_path / "ssh-cas.pub")})
        verifiers = {
            x509pop.NAME: x509pop.X509PopVerifier(TD, x509_config, self.datastore,
                                                  self.clock).verify,
            sshpop.NAME: sshpop.SshPopVerifier(TD, ssh_config, self.datastore,
                                               self.clock).verify,
            k8s_psat.NAME: k8s_psat.K8sPsatVerifier(TD).verify,
        }
        deps = ApiDeps(config=self.config, datastore=self.datastore, authority=authority,
                       clock=self.clock, node_verifiers=verifiers)
        self.servicer = AgentServicer(deps, peer_certificate=lambda _p: (True, None),
                                      rate_limiter=RateLimiter(attestation=RateLimit(0, 1),
                                                               signing=RateLimit(0, 1)))

    def refused(self, attestor: str, payload: bytes) -> grpc.StatusCode:
        request = agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type=attestor, payload=payload),
            csr=new_csr(generate_private_key()))
        with pytest.raises(Aborted) as info:
            self.servicer.AttestAgent(request, _Context())
        with self.datastore.engine.connect() as conn:
            assert not conn.execute(m.AttestedNode.__table__.select()).first()
        return info.value.code


@pytest.fixture
def harness(tmp_path: Path, database_url: str) -> Iterator[Harness]:
    h = Harness(tmp_path, database_url)
    try:
        yield h
    finally:
        h.datastore.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _x509_payload(*ders: bytes) -> bytes:
    return json.dumps({"certificates": [_b64(d) for d in ders],
                       "csr_key_sha256": _b64(hashlib.sha256(b"k").digest()),
                       "nonce": _b64(os.urandom(32)), "signature": _b64(b"sig")}).encode()


def _ssh_payload(certificate: str) -> bytes:
    return json.dumps({"certificate": certificate,
                       "csr_key_sha256": _b64(hashlib.sha256(b"k").digest()),
                       "nonce": _b64(os.urandom(32)), "signature": _b64(b"sig")}).encode()


def _duplicate_extension_leaf(h: Harness) -> bytes:
    # Two keyUsage extensions: the builder refuses that, so an unknown extension
    # (2.5.29.99) is renamed to keyUsage (2.5.29.15) in the DER.
    leaf_key = new_key("ec")
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "n")]))
            .issuer_name(h.ca.cert.subject).public_key(leaf_key.public_key())
            .serial_number(5).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                         False, False), critical=True)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"),
                                                      b"\x03\x02\x07\x80"), critical=False)
            .sign(h.ca.key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert der.count(b"\x06\x03\x55\x1d\x63") == 1
    return der.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x0f")


def _unknown_key_leaf(h: Harness) -> bytes:
    # An Ed25519 key whose algorithm OID (1.3.101.112) is changed to 1.3.101.99.
    der = x509_leaf(h.ca, new_key("ed25519"), now=NOW).public_bytes(serialization.Encoding.DER)
    assert der.count(b"\x06\x03\x2b\x65\x70") == 1
    return der.replace(b"\x06\x03\x2b\x65\x70", b"\x06\x03\x2b\x65\x63")


def test_x509pop_duplicate_extension_is_refused_not_internal(harness: Harness) -> None:
    payload = _x509_payload(_duplicate_extension_leaf(harness))
    assert harness.refused(x509pop.NAME, payload) == grpc.StatusCode.PERMISSION_DENIED


def test_x509pop_unknown_key_algorithm_is_refused_not_internal(harness: Harness) -> None:
    payload = _x509_payload(_unknown_key_leaf(harness))
    assert harness.refused(x509pop.NAME, payload) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("certificate", [
    "ssh-dss-cert-v01@openssh.com AAAA",
    "ssh-foo-cert-v01@openssh.com AAAAB3NzaC1kc3MtY2VydC12MDFAb3BlbnNzaC5jb20=",
])
def test_sshpop_unsupported_certificate_type_is_refused_not_internal(
        harness: Harness, certificate: str) -> None:
    assert harness.refused(sshpop.NAME, _ssh_payload(certificate)) \
        == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("attestor", [x509pop.NAME, sshpop.NAME, k8s_psat.NAME,
                                      join_token.NAME])
def test_deeply_nested_json_is_invalid_argument_not_internal(harness: Harness,
                                                              attestor: str) -> None:
    assert harness.refused(attestor, DEEP) == grpc.StatusCode.INVALID_ARGUMENT
