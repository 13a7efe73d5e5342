"""x509pop: both halves, with CAs and node certificates made at run time."""

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
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from attestation.node import pop, x509pop
from attestation.node.errors import AttestationError, MalformedAttestationError
from identity.clock import FakeClock
from identity.keys import generate_private_key
from identity.selectors import Selector
from identity.spiffeid import TrustDomain
from identity.x509svid import new_csr
from tests.support.pop import (
    Key,
    MemoryNonces,
    X509Ca,
    new_key,
    pem,
    sha1_hex,
    write_x509_node,
    x509_ca,
    x509_leaf,
)

TD = TrustDomain("example.org")
CSR_KEY = generate_private_key()
CSR = new_csr(CSR_KEY)
# Computed here, not with pop.csr_binding: the SHA-256 of the CSR key's SPKI.
BINDING = hashlib.sha256(CSR_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


@dataclass
class World:
    clock: FakeClock
    ca: X509Ca
    nonces: MemoryNonces
    verifier: x509pop.X509PopVerifier
    tmp: Path

    @property
    def now(self) -> dt.datetime:
        return self.clock.now()

    def answer(self, chain: list[x509.Certificate], key: Key, *, attestor: str = x509pop.NAME,
               trust_domain: TrustDomain = TD, nonce: bytes | None = None) -> bytes:
        """What an agent with these credentials sends (a fresh nonce unless given)."""
        if nonce is None:
            nonce, _ = pop.issue_nonce(self.nonces, attestor=attestor, now=self.now)
        config = write_x509_node(self.tmp / "node", chain, key)
        _kind, payload = x509pop.make_attestation(config, trust_domain=trust_domain,
                                                  nonce=nonce, csr=CSR)
        return payload


def _world(tmp_path: Path, template: str = x509pop.DEFAULT_TEMPLATE) -> World:
    clock = FakeClock()
    ca = x509_ca("Node CA", now=clock.now())
    nonces = MemoryNonces()
    config = x509pop.ServerAttestorConfig(
        ca_bundle=(ca.cert.public_bytes(serialization.Encoding.DER),),
        agent_path_template=pop.PathTemplate.parse(x509pop.NAME, template,
                                                   x509pop.PLACEHOLDERS))
    return World(clock, ca, nonces, x509pop.X509PopVerifier(TD, config, nonces, clock), tmp_path)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return _world(tmp_path)


@pytest.mark.parametrize("kind", ["ec", "rsa", "ed25519"])
def test_attests_each_key_type(world: World, kind: str) -> None:
    key = new_key(kind)
    leaf = x509_leaf(world.ca, key, now=world.now, serial=0xABC,
                     uris=("spiffe://legacy.example/host/node-1",))
    result = world.verifier.verify(world.answer([leaf], key))
    assert str(result.agent_id) == f"spiffe://example.org/sigil/agent/x509pop/{sha1_hex(leaf)}"
    assert result.selectors == (
        Selector("x509pop", "subject:cn:node-1"),
        Selector("x509pop", f"ca:fingerprint:{sha1_hex(world.ca.cert)}"),
        Selector("x509pop", "san:dns:node-1.example.org"),
        Selector("x509pop", "san:uri:spiffe://legacy.example/host/node-1"),
        Selector("x509pop", "serialnumber:abc"),
    )
    assert result.alias is None
    assert result.csr_binding == BINDING
    assert world.nonces.issued == {}, "the answered nonce is spent"


def test_intermediates_are_sent_and_become_selectors(world: World) -> None:
    intermediate = x509_ca("Rack CA", now=world.now, parent=world.ca)
    key = new_key()
    leaf = x509_leaf(intermediate, key, now=world.now)
    result = world.verifier.verify(world.answer([leaf, intermediate.cert], key))
    fingerprints = [s.value for s in result.selectors if s.value.startswith("ca:")]
    assert fingerprints == [f"ca:fingerprint:{sha1_hex(intermediate.cert)}",
                            f"ca:fingerprint:{sha1_hex(world.ca.cert)}"]


def test_same_certificate_attests_again_with_the_same_id(world: World) -> None:
    key = new_key()
    leaf = x509_leaf(world.ca, key, now=world.now)
    first = world.verifier.verify(world.answer([leaf], key))
    second = world.verifier.verify(world.answer([leaf], key))
    assert first.agent_id == second.agent_id


def test_agent_path_template(tmp_path: Path) -> None:
    world = _world(tmp_path, "x509pop/cn/{subject_cn}/{serial}")
    key = new_key()
    leaf = x509_leaf(world.ca, key, now=world.now, cn="web-7", serial=0x1F)
    result = world.verifier.verify(world.answer([leaf], key))
    assert str(result.agent_id) == "spiffe://example.org/sigil/agent/x509pop/cn/web-7/1f"
    # A CN that cannot be a path segment is refused, not mangled; the nonce stays.
    bad = x509_leaf(world.ca, key, now=world.now, cn="web 7/../x")
    nonce, _ = pop.issue_nonce(world.nonces, attestor=x509pop.NAME, now=world.now)
    with pytest.raises(AttestationError, match=r"\{subject_cn\} value 'web 7/../x' cannot"):
        world.verifier.verify(world.answer([bad], key, nonce=nonce))
    no_cn = x509_leaf(world.ca, key, now=world.now, cn=None)
    with pytest.raises(AttestationError, match=r"needs \{subject_cn\}"):
        world.verifier.verify(world.answer([no_cn], key, nonce=nonce))
    assert len(world.nonces.issued) == 1


@pytest.mark.parametrize(("template", "message"), [
    ("{fingerprint}", "must start with 'x509pop/'"),
    ("join_token/{fingerprint}", "must start with 'x509pop/'"),
    ("x509pop/{hostname}", r"unknown placeholder \{hostname\}"),
    ("x509pop/{fingerprint!r}", "unknown placeholder"),
    ("x509pop/{fingerprint", "x509pop/{fingerprint"),
    ("x509pop/a b/{fingerprint}", "only letters"),
    ("x509pop//{fingerprint}", "the agent ID is not valid"),
    ("x509pop/../{fingerprint}", "the agent ID is not valid"),
])
def test_bad_templates_are_refused_at_load(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pop.PathTemplate.parse(x509pop.NAME, template, x509pop.PLACEHOLDERS)


def _sign_with_other_key(w: World) -> bytes:
    key = new_key()
    payload = json.loads(w.answer([x509_leaf(w.ca, key, now=w.now)], key))
    nonce = base64.b64decode(payload["nonce"])
    other = new_key()
    payload["signature"] = pop.b64encode(
        pop.sign(other, pop.challenge_message(x509pop.NAME, TD, BINDING, nonce)))
    return json.dumps(payload).encode()


def _truncate(field: str, keep: Callable[[bytes], bytes]) -> Callable[[World], bytes]:
    def build(w: World) -> bytes:
        key = new_key()
        payload = json.loads(w.answer([x509_leaf(w.ca, key, now=w.now)], key))
        if field == "certificates":
            der = base64.b64decode(payload["certificates"][0])
            payload["certificates"] = [pop.b64encode(keep(der))]
        else:
            payload[field] = pop.b64encode(keep(base64.b64decode(payload[field])))
        return json.dumps(payload).encode()
    return build


def _leaf_case(**kwargs: object) -> Callable[[World], bytes]:
    def build(w: World) -> bytes:
        options = dict(kwargs)
        key = new_key(str(options.pop("key", "ec")))
        return w.answer([x509_leaf(w.ca, key, now=w.now, **options)], key)  # type: ignore[arg-type]
    return build


def _other_ca(w: World) -> bytes:
    other = x509_ca("Node CA", now=w.now)  # same name, another key
    key = new_key()
    return w.answer([x509_leaf(other, key, now=w.now)], key)


def _unissued_nonce(w: World) -> bytes:
    key = new_key()
    return w.answer([x509_leaf(w.ca, key, now=w.now)], key, nonce=b"\x01" * 32)


def _nonce_for_sshpop(w: World) -> bytes:
    key = new_key()
    nonce, _ = pop.issue_nonce(w.nonces, attestor="sshpop", now=w.now)
    return w.answer([x509_leaf(w.ca, key, now=w.now)], key, nonce=nonce)


def _other_csr_key(w: World) -> bytes:
    # A proof made for one CSR key, presented as if for another.
    key = new_key()
    payload = json.loads(w.answer([x509_leaf(w.ca, key, now=w.now)], key))
    payload["csr_key_sha256"] = pop.b64encode(pop.csr_binding(new_csr(generate_private_key())))
    return json.dumps(payload).encode()


def _other_trust_domain(w: World) -> bytes:
    key = new_key()
    return w.answer([x509_leaf(w.ca, key, now=w.now)], key,
                    trust_domain=TrustDomain("other.example"))


NOW = FakeClock().now()

REFUSALS: list[tuple[str, Callable[[World], bytes], str]] = [
    ("expired", _leaf_case(not_after=NOW - dt.timedelta(seconds=1)),
     "the node certificate expired at"),
    ("not yet valid", _leaf_case(not_before=NOW + dt.timedelta(hours=1)),
     "the node certificate is not valid before"),
    ("wrong CA", _other_ca, "does not chain to the configured CA bundle"),
    ("no digitalSignature", _leaf_case(digital_signature=False),
     "keyUsage does not allow digitalSignature"),
    ("no keyUsage", _leaf_case(digital_signature=None),
     "keyUsage does not allow digitalSignature"),
    ("serverAuth only", _leaf_case(eku=(ExtendedKeyUsageOID.SERVER_AUTH,)),
     "extendedKeyUsage does not allow clientAuth"),
    ("CA as leaf", _leaf_case(is_ca=True), "is a CA certificate"),
    ("weak RSA", _leaf_case(key="rsa1024"), "RSA key of 1024 bits is too weak"),
    ("wrong key", _sign_with_other_key, "signature over the challenge does not verify"),
    ("other trust domain", _other_trust_domain, "signature over the challenge does not verify"),
    ("other CSR key", _other_csr_key, "signature over the challenge does not verify"),
    ("unissued nonce", _unissued_nonce, "nonce was not issued for x509pop"),
    ("nonce of sshpop", _nonce_for_sshpop, "nonce was not issued for x509pop"),
    ("truncated certificate", _truncate("certificates", lambda b: b[: len(b) // 2]),
     "certificate 0 of the chain cannot be parsed"),
    ("truncated signature", _truncate("signature", lambda b: b[:-4]),
     "signature over the challenge does not verify"),
    ("truncated nonce", _truncate("nonce", lambda b: b[:16]),
     "signature over the challenge does not verify"),
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


def test_replay_and_expired_nonce(world: World) -> None:
    key = new_key()
    payload = world.answer([x509_leaf(world.ca, key, now=world.now)], key)
    world.verifier.verify(payload)
    with pytest.raises(AttestationError, match="already used"):
        world.verifier.verify(payload)
    late = world.answer([x509_leaf(world.ca, key, now=world.now)], key)
    world.clock.advance(pop.NONCE_TTL + dt.timedelta(seconds=1))
    with pytest.raises(AttestationError, match="has expired"):
        world.verifier.verify(late)


@pytest.mark.parametrize(("payload", "message"), [
    (b'{"certificates": ["AAAA"], "nonce": "AAAA", "signa', "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "payload must be"),
    (b'{"certificates": [], "nonce": "AA==", "signature": "AA=="}', "1 to 8 certificates"),
    (json.dumps({"certificates": ["AA=="] * 9, "nonce": "AA==", "signature": "AA=="}).encode(),
     "1 to 8 certificates"),
    (b'{"certificates": ["%%%"], "nonce": "AA==", "signature": "AA=="}', "not base64"),
    (b'{"certificates": ["AA=="], "csr_key_sha256": "AA==", "signature": "AA=="}',
     "'csr_key_sha256' must be a SHA-256"),
    (json.dumps({"certificates": ["AA=="], "csr_key_sha256": pop.b64encode(b"b" * 32),
                 "signature": "AA=="}).encode(), "'nonce' must be"),
    (b'{"certificates": [1], "nonce": "AA==", "signature": "AA=="}', "must be a base64"),
    (b" " * (x509pop.MAX_PAYLOAD_BYTES + 1), "larger than"),
])
def test_malformed_payloads(world: World, payload: bytes, message: str) -> None:
    with pytest.raises(MalformedAttestationError, match=message):
        world.verifier.verify(payload)


def test_agent_half_refuses_a_key_of_another_certificate(world: World) -> None:
    key, other = new_key(), new_key()
    config = write_x509_node(world.tmp / "node", [x509_leaf(world.ca, key, now=world.now)],
                             other)
    with pytest.raises(MalformedAttestationError, match="does not belong to"):
        x509pop.make_attestation(config, trust_domain=TD, nonce=b"n" * 32, csr=CSR)


def test_agent_half_appends_intermediates(world: World) -> None:
    intermediate = x509_ca("Rack CA", now=world.now, parent=world.ca)
    key = new_key("ed25519")
    leaf = x509_leaf(intermediate, key, now=world.now)
    config = write_x509_node(world.tmp / "node", [leaf], key)
    (world.tmp / "inter.pem").write_bytes(pem(intermediate.cert))
    config = x509pop.AgentAttestorConfig(config.certificate_path, config.private_key_path,
                                         world.tmp / "inter.pem")
    nonce, _ = pop.issue_nonce(world.nonces, attestor=x509pop.NAME, now=world.now)
    kind, payload = x509pop.make_attestation(config, trust_domain=TD, nonce=nonce, csr=CSR)
    assert kind == "x509pop"
    sent = [base64.b64decode(c) for c in json.loads(payload)["certificates"]]
    assert sent == [c.public_bytes(serialization.Encoding.DER) for c in (leaf, intermediate.cert)]
    assert world.verifier.verify(payload).agent_id.path.endswith(sha1_hex(leaf))


@pytest.mark.parametrize(("table", "message"), [
    ({}, "ca_bundle_path is required"),
    ({"ca_bundle_path": "/nonexistent/ca.pem"}, "cannot read"),
    ({"ca_bundle_path": "EMPTY"}, "holds no PEM certificate"),
    ({"ca_bundle_path": "CA", "agent_path_template": 3}, "must be a string"),
    ({"ca_bundle_path": "CA", "agent_path_template": "{fingerprint}"}, "must start with"),
    ({"ca_bundle_path": "CA", "mode": "spiffe"}, "unknown key 'node_attestors.x509pop.mode'"),
])
def test_server_config(tmp_path: Path, table: dict[str, object], message: str) -> None:
    ca = x509_ca("Node CA", now=NOW)
    (tmp_path / "ca.pem").write_bytes(pem(ca.cert))
    (tmp_path / "empty.pem").write_text("")
    paths = {"CA": str(tmp_path / "ca.pem"), "EMPTY": str(tmp_path / "empty.pem")}
    table = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in table.items()}
    with pytest.raises(ValueError, match=message):
        x509pop.parse_server_config(table)
    good = x509pop.parse_server_config({"ca_bundle_path": paths["CA"]})
    assert good.certificates() == [ca.cert]
    # The configuration goes to worker processes by pickling.
    assert pickle.loads(pickle.dumps(good)) == good
    assert good.agent_path_template.template == "x509pop/{fingerprint}"


@pytest.mark.parametrize(("table", "message"), [
    ({"certificate_path": "/c.pem"}, "private_key_path is required"),
    ({"private_key_path": "/k.pem"}, "certificate_path is required"),
    ({"certificate_path": "/c", "private_key_path": "/k", "x": 1}, "unknown key"),
    ({"certificate_path": "/c", "private_key_path": ""}, "private_key_path is required"),
])
def test_agent_config(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        x509pop.parse_agent_config(table)
    assert x509pop.parse_agent_config(
        {"certificate_path": "/c", "private_key_path": "/k"}
    ) == x509pop.AgentAttestorConfig(Path("/c"), Path("/k"))

