"""sshpop: both halves, with SSH CAs and host certificates made at run time."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import SSHCertificate, SSHCertificateType

from agent.config import load_config as load_agent_config
from attestation.node import pop, sshpop
from attestation.node.errors import AttestationError, MalformedAttestationError
from ca.config.server import load_config as load_server_config
from identity.clock import FakeClock
from identity.keys import generate_private_key
from identity.selectors import Selector
from identity.spiffeid import TrustDomain
from identity.x509svid import new_csr
from tests.support.pop import Key, MemoryNonces, new_key, ssh_host_cert, ssh_public, write_ssh_node

TD = TrustDomain("example.org")
CSR = new_csr(generate_private_key())
NOW = FakeClock().now()


def _fp(blob_line: bytes) -> str:
    """SPIRE's encoding, computed independently: SHA-256 of the blob, unpadded URL-safe."""
    digest = hashlib.sha256(base64.b64decode(blob_line.split()[1])).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass
class World:
    clock: FakeClock
    ca_key: Key
    nonces: MemoryNonces
    verifier: sshpop.SshPopVerifier
    tmp: Path

    @property
    def now(self) -> dt.datetime:
        return self.clock.now()

    def answer(self, cert: SSHCertificate, key: Key, *, attestor: str = sshpop.NAME,
               trust_domain: TrustDomain = TD, nonce: bytes | None = None) -> bytes:
        if nonce is None:
            nonce, _ = pop.issue_nonce(self.nonces, attestor=attestor, now=self.now)
        config = write_ssh_node(self.tmp / "node", cert, key)
        return sshpop.make_attestation(config, trust_domain=trust_domain, nonce=nonce,
                                       csr=CSR)[1]

    def host(self, kind: str = "ed25519", **kwargs: object) -> tuple[SSHCertificate, Key]:
        key = new_key(kind)
        return ssh_host_cert(self.ca_key, key, now=self.now, **kwargs), key  # type: ignore[arg-type]


def _world(tmp_path: Path, template: str = sshpop.DEFAULT_TEMPLATE) -> World:
    clock = FakeClock()
    ca_key = new_key("ed25519")
    (tmp_path / "cas").write_bytes(b"# fleet CA\n\ncert-authority " + ssh_public(ca_key)
                                   + b" fleet-ca\n")
    config = sshpop.parse_server_config({"cert_authorities_path": str(tmp_path / "cas"),
                                         "agent_path_template": template})
    nonces = MemoryNonces()
    return World(clock, ca_key, nonces, sshpop.SshPopVerifier(TD, config, nonces, clock),
                 tmp_path)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return _world(tmp_path)


@pytest.mark.parametrize("kind", ["ed25519", "ec", "rsa"])
def test_attests_each_key_type(world: World, kind: str) -> None:
    cert, key = world.host(kind)
    result = world.verifier.verify(world.answer(cert, key))
    assert str(result.agent_id) == (
        f"spiffe://example.org/sigil/agent/sshpop/{_fp(cert.public_bytes())}")
    assert result.selectors == (
        Selector("sshpop", "principal:node-1"),
        Selector("sshpop", "principal:node-1.example.org"),
        Selector("sshpop", "key_id:node-1"),
        Selector("sshpop", f"ca:fingerprint:{_fp(ssh_public(world.ca_key))}"),
    )
    assert result.csr_binding == pop.csr_binding(CSR)
    assert world.nonces.issued == {}


def test_same_certificate_attests_again_with_the_same_id(world: World) -> None:
    cert, key = world.host()
    first = world.verifier.verify(world.answer(cert, key))
    assert world.verifier.verify(world.answer(cert, key)).agent_id == first.agent_id


def test_agent_path_template(tmp_path: Path) -> None:
    world = _world(tmp_path, "sshpop/{principal}/{key_id}")
    cert, key = world.host(principals=("vm-12.example.org",), key_id="fleet-12")
    result = world.verifier.verify(world.answer(cert, key))
    assert str(result.agent_id) == (
        "spiffe://example.org/sigil/agent/sshpop/vm-12.example.org/fleet-12")
    cert, key = world.host(principals=())
    nonce, _ = pop.issue_nonce(world.nonces, attestor=sshpop.NAME, now=world.now)
    with pytest.raises(AttestationError, match=r"needs \{principal\}"):
        world.verifier.verify(world.answer(cert, key, nonce=nonce))
    assert len(world.nonces.issued) == 1


def _host_case(**kwargs: object) -> Callable[[World], bytes]:
    def build(w: World) -> bytes:
        options = dict(kwargs)
        cert, key = w.host(str(options.pop("kind", "ed25519")), **options)
        return w.answer(cert, key)
    return build


def _other_ca(w: World) -> bytes:
    key = new_key("ed25519")
    return w.answer(ssh_host_cert(new_key("ed25519"), key, now=w.now), key)


def _wrong_key(w: World) -> bytes:
    cert, key = w.host()
    payload = json.loads(w.answer(cert, key))
    nonce = base64.b64decode(payload["nonce"])
    payload["signature"] = pop.b64encode(
        pop.sign(new_key("ed25519"),
                 pop.challenge_message(sshpop.NAME, TD, pop.csr_binding(CSR), nonce)))
    return json.dumps(payload).encode()


def _tampered_certificate(w: World) -> bytes:
    # Another principal in the signed blob: the CA's signature no longer verifies.
    cert, key = w.host(principals=("node-1",))
    payload = json.loads(w.answer(cert, key))
    kind, blob = payload["certificate"].split()[:2]
    raw = base64.b64decode(blob).replace(b"node-1", b"node-9")
    payload["certificate"] = f"{kind} {base64.b64encode(raw).decode()}"
    return json.dumps(payload).encode()


def _truncated_certificate(w: World) -> bytes:
    cert, key = w.host()
    payload = json.loads(w.answer(cert, key))
    kind, blob = payload["certificate"].split()[:2]
    raw = base64.b64decode(blob)
    payload["certificate"] = f"{kind} {base64.b64encode(raw[: len(raw) // 2]).decode()}"
    return json.dumps(payload).encode()


def _plain_key(w: World) -> bytes:
    cert, key = w.host()
    payload = json.loads(w.answer(cert, key))
    payload["certificate"] = ssh_public(key).decode()
    return json.dumps(payload).encode()


def _truncated_signature(w: World) -> bytes:
    cert, key = w.host()
    payload = json.loads(w.answer(cert, key))
    payload["signature"] = pop.b64encode(base64.b64decode(payload["signature"])[:-3])
    return json.dumps(payload).encode()


def _other_csr_key(w: World) -> bytes:
    cert, key = w.host()
    payload = json.loads(w.answer(cert, key))
    payload["csr_key_sha256"] = pop.b64encode(pop.csr_binding(new_csr(generate_private_key())))
    return json.dumps(payload).encode()


def _nonce_of(attestor: str | None) -> Callable[[World], bytes]:
    def build(w: World) -> bytes:
        cert, key = w.host()
        nonce = (b"\x02" * 32 if attestor is None
                 else pop.issue_nonce(w.nonces, attestor=attestor, now=w.now)[0])
        return w.answer(cert, key, nonce=nonce)
    return build


REFUSALS: list[tuple[str, Callable[[World], bytes], str]] = [
    ("expired", _host_case(valid_before=NOW - dt.timedelta(seconds=1)),
     "host certificate expired at"),
    ("not yet valid", _host_case(valid_after=NOW + dt.timedelta(minutes=5)),
     "host certificate is not valid before"),
    ("wrong CA", _other_ca, "which is not in cert_authorities_path"),
    ("user certificate", _host_case(cert_type=SSHCertificateType.USER),
     "is a user certificate"),
    ("critical option", _host_case(critical_options=[("force-command", "/bin/true")]),
     r"critical options \(force-command\)"),
    ("weak RSA host key", _host_case(kind="rsa1024"), "RSA key of 1024 bits is too weak"),
    ("wrong key", _wrong_key, "signature over the challenge does not verify"),
    ("tampered certificate", _tampered_certificate, "signature does not verify"),
    ("truncated certificate", _truncated_certificate, "cannot be parsed"),
    ("plain public key", _plain_key, "cannot be parsed"),
    ("truncated signature", _truncated_signature, "signature over the challenge does not"),
    ("other CSR key", _other_csr_key, "signature over the challenge does not verify"),
    ("unissued nonce", _nonce_of(None), "nonce was not issued for sshpop"),
    ("nonce of x509pop", _nonce_of("x509pop"), "nonce was not issued for sshpop"),
]


@pytest.mark.parametrize(("build", "message"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refusals(world: World, build: Callable[[World], bytes], message: str) -> None:
    payload = build(world)
    before = dict(world.nonces.issued)
    with pytest.raises(AttestationError, match=message) as info:
        world.verifier.verify(payload)
    assert not isinstance(info.value, MalformedAttestationError)
    assert world.nonces.issued == before, "a refused proof spends no nonce"


def test_other_trust_domain_and_replay(world: World) -> None:
    cert, key = world.host()
    with pytest.raises(AttestationError, match="does not verify"):
        world.verifier.verify(world.answer(cert, key, trust_domain=TrustDomain("b.example")))
    payload = world.answer(cert, key)
    world.verifier.verify(payload)
    with pytest.raises(AttestationError, match="already used"):
        world.verifier.verify(payload)


@pytest.mark.parametrize(("payload", "message"), [
    (b'{"certificate": "ssh-ed25519-cert-v01@openssh.com AAAA", "nonce": "AA', "not JSON"),
    (b'{"nonce": "AA==", "signature": "AA=="}', "payload must be"),
    (b'{"certificate": "x", "csr_key_sha256": "", "nonce": "AA==", "signature": "AA=="}',
     "'csr_key_sha256' must be a base64"),
    (json.dumps({"certificate": "x", "csr_key_sha256": pop.b64encode(b"b" * 32),
                 "nonce": "AA==", "signature": "**"}).encode(), "'signature' is not base64"),
    (json.dumps({"certificate": "x", "csr_key_sha256": pop.b64encode(b"b" * 31),
                 "nonce": "AA==", "signature": "AA=="}).encode(),
     "'csr_key_sha256' must be a SHA-256"),
    (b" " * (sshpop.MAX_PAYLOAD_BYTES + 1), "larger than"),
])
def test_malformed_payloads(world: World, payload: bytes, message: str) -> None:
    with pytest.raises(MalformedAttestationError, match=message):
        world.verifier.verify(payload)


def test_agent_half_refuses_a_key_of_another_certificate(world: World) -> None:
    cert, _key = world.host()
    config = write_ssh_node(world.tmp / "node", cert, new_key("ed25519"))
    with pytest.raises(MalformedAttestationError, match="is not the key certified by"):
        sshpop.make_attestation(config, trust_domain=TD, nonce=b"n" * 32, csr=CSR)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "holds no SSH public key"),
    (b"# only a comment\n", "holds no SSH public key"),
    (b"ssh-ed25519\n", ":1: not an SSH public key line"),
    (b"ssh-ed25519 AAAAnotakey\n", ":1: not an SSH public key line"),
    (b"\nhello world\n", ":2: not an SSH public key line"),
])
def test_cert_authorities_file(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "cas").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        sshpop.parse_server_config({"cert_authorities_path": str(tmp_path / "cas")})


@pytest.mark.parametrize(("table", "message"), [
    ({}, "cert_authorities_path is required"),
    ({"cert_authorities_path": "/nonexistent"}, "cannot read"),
    ({"cert_authorities": ["ssh-ed25519 AAAA"]}, "unknown key"),
])
def test_server_config(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sshpop.parse_server_config(table)


def test_agent_config_defaults_and_errors() -> None:
    assert sshpop.parse_agent_config({}) == sshpop.AgentAttestorConfig(
        Path("/etc/ssh/ssh_host_rsa_key"), Path("/etc/ssh/ssh_host_rsa_key-cert.pub"))
    with pytest.raises(ValueError, match=r"unknown key 'node_attestor\.sshpop\.host_key'"):
        sshpop.parse_agent_config({"host_key": "/k"})
    with pytest.raises(ValueError, match="host_cert_path must be a file path"):
        sshpop.parse_agent_config({"host_cert_path": 5})


def test_agent_and_server_config_files(tmp_path: Path) -> None:
    agent_file = tmp_path / "agent.toml"
    agent_file.write_text('trust_domain = "example.org"\nserver_address = "s:8081"\n'
                          '[node_attestor.sshpop]\n'
                          'host_key_path = "/etc/ssh/ssh_host_ed25519_key"\n')
    agent_cfg = load_agent_config(agent_file)
    assert agent_cfg.sshpop == sshpop.AgentAttestorConfig(
        Path("/etc/ssh/ssh_host_ed25519_key"), Path("/etc/ssh/ssh_host_rsa_key-cert.pub"))
    assert (agent_cfg.x509pop, agent_cfg.k8s_psat, agent_cfg.uses_join_token) == (
        None, None, False)
    ca_key = new_key("ed25519")
    (tmp_path / "cas.pub").write_bytes(ssh_public(ca_key) + b"\n")
    server_file = tmp_path / "server.toml"
    server_file.write_text('trust_domain = "example.org"\n[node_attestors.sshpop]\n'
                           f'cert_authorities_path = "{tmp_path / "cas.pub"}"\n')
    server_cfg = load_server_config(server_file, env={})
    assert server_cfg.node_pop.x509pop is None
    assert server_cfg.node_pop.sshpop is not None
    assert server_cfg.node_pop.sshpop.cert_authorities == (ssh_public(ca_key),)
    assert server_cfg.kubernetes.psat_clusters == ()
    # The whole configuration goes to worker processes by pickling.
    assert pickle.loads(pickle.dumps(server_cfg)) == server_cfg
