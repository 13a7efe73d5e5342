"""The x509pop node attestor (X.509 proof of possession), both halves.

The node holds a certificate (and its private key) issued out of band by a CA
the server trusts (``ca_bundle_path``). The agent asks for a challenge nonce,
signs it (:mod:`attestation.node.pop`) and sends its certificate chain, the
nonce and the signature. The server:

1. parses the chain (leaf first; at most :data:`MAX_CHAIN` certificates);
2. requires a leaf that is not a CA, whose keyUsage allows digitalSignature and
   whose extendedKeyUsage, if present, allows clientAuth, with an RSA (2048+),
   ECDSA (P-256/384/521) or Ed25519 key;
3. validates the path (RFC 5280) from the leaf through the sent intermediates to
   a CA of the bundle, at the current time;
4. verifies the signature over the challenge with the leaf's key;
5. spends the nonce (issued for x509pop, unexpired, unused) -- last, so a
   refused proof spends nothing.

The agent ID is ``spiffe://<td>/sigil/agent/x509pop/<fingerprint>`` (the SHA-1 of
the leaf's DER, lowercase hex, as SPIRE's), or ``agent_path_template``. A node
may attest again with the same certificate (a restarted agent, a cleared data
dir): it gets the same ID. Node selectors, following SPIRE's names:
``x509pop:subject:cn:<cn>``, ``x509pop:ca:fingerprint:<sha1>`` (each certificate
above the leaf: intermediates and the root), ``x509pop:san:dns:<name>``,
``x509pop:san:uri:<uri>``, ``x509pop:serialnumber:<hex>``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestation.node import AttestationResult, pop
from attestation.node.errors import AttestationError, MalformedAttestationError
from identity.clock import Clock
from identity.selectors import Selector
from identity.spiffeid import TrustDomain

NAME = "x509pop"
"""The attestor's name: ``AttestationData.type`` and the selector type."""

DEFAULT_TEMPLATE = "x509pop/{fingerprint}"
PLACEHOLDERS = frozenset({"fingerprint", "subject_cn", "serial", "san_dns"})
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_CHAIN = 8
MAX_BUNDLE_BYTES = 1024 * 1024
_E = TypeVar("_E", bound=x509.ExtensionType)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-1 of the certificate's DER, lowercase hex (SPIRE's x509pop fingerprint).

    SHA-1 is only a name here, as in SPIRE: trust comes from path validation and
    the proof of possession, not from the fingerprint.
    """
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()  # noqa: S324


def load_pem_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """Every PEM certificate in a file.

    Raises:
        ValueError: unreadable, too large, or holding no certificate.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(f"{what} {path} is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{what} {path} holds no PEM certificate") from None
    return certs


# ---- agent half -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentAttestorConfig:
    """The agent's ``[node_attestor.x509pop]``.

    Attributes:
        certificate_path: PEM: the node's certificate, then any intermediates.
        private_key_path: PEM (PKCS#8, PKCS#1 or SEC1) private key of the certificate.
        intermediates_path: optional PEM intermediates, appended to the chain.
    """

    certificate_path: Path
    private_key_path: Path
    intermediates_path: Path | None = None


def parse_agent_config(table: object) -> AgentAttestorConfig:
    """Validate the agent's ``[node_attestor.x509pop]`` table (paths only; the
    files are read at each attestation, so a renewed certificate is picked up).

    Raises:
        ValueError: an unknown key, or a missing or bad value, naming the key.
    """
    where = f"node_attestor.{NAME}"
    table = pop.check_table(where, table,
                            ("certificate_path", "private_key_path", "intermediates_path"))
    paths: dict[str, Path] = {}
    for key in ("certificate_path", "private_key_path", "intermediates_path"):
        value = table.get(key)
        if value is None and key == "intermediates_path":
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.{key} is required: a file path")
        paths[key] = Path(value)
    return AgentAttestorConfig(**paths)


def load_credentials(config: AgentAttestorConfig) -> tuple[list[x509.Certificate], pop.SigningKey]:
    """The node's chain (leaf first) and private key, read from their files.

    Raises:
        MalformedAttestationError: unreadable files, no certificate, an unsupported
            key, or a key that is not the certificate's.
    """
    try:
        chain = load_pem_certificates(config.certificate_path, "x509pop certificate_path")
        if config.intermediates_path is not None:
            chain += load_pem_certificates(config.intermediates_path,
                                           "x509pop intermediates_path")
        key_pem = config.private_key_path.read_bytes()
    except (ValueError, OSError) as exc:
        raise MalformedAttestationError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise MalformedAttestationError(
            f"x509pop private_key_path {config.private_key_path} is not an unencrypted "
            "PEM private key") from None
    key = pop.signing_key(NAME, key, "private key")
    if key.public_key() != chain[0].public_key():
        raise MalformedAttestationError(
            f"x509pop: the private key {config.private_key_path} does not belong to the "
            f"first certificate of {config.certificate_path}")
    return chain, key


def make_attestation(config: AgentAttestorConfig, *, trust_domain: TrustDomain,
                     nonce: bytes, csr: bytes) -> tuple[str, bytes]:
    """Answer a challenge: the chain, the nonce and the signature over it.

    Returns:
        ``("x509pop", payload)``.

    Raises:
        MalformedAttestationError: the credentials cannot be used (see
            :func:`load_credentials`).
    """
    chain, key = load_credentials(config)
    return pop.make_answer(NAME, key, trust_domain=trust_domain, nonce=nonce, csr=csr,
                           credential={"certificates": [
                               pop.b64encode(c.public_bytes(serialization.Encoding.DER))
                               for c in chain]})


# ---- server half ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerAttestorConfig:
    """The server's ``[node_attestors.x509pop]``.

    Attributes:
        ca_bundle: the CA certificates node certificates must chain to, DER (bytes
            pickle: the configuration travels to worker processes).
        agent_path_template: the agent ID's path after ``/sigil/agent/``.
    """

    ca_bundle: tuple[bytes, ...]
    agent_path_template: pop.PathTemplate

    def certificates(self) -> list[x509.Certificate]:
        """The CA bundle, parsed."""
        return [x509.load_der_x509_certificate(der) for der in self.ca_bundle]


def parse_server_config(table: object) -> ServerAttestorConfig:
    """Validate ``[node_attestors.x509pop]`` and read its CA bundle now.

    Raises:
        ValueError: an unknown key, a missing or bad value, or an unreadable bundle.
    """
    bundle, template = pop.parse_server_table(
        NAME, table, path_key="ca_bundle_path",
        path_help="a PEM file of the CA certificates that issue node certificates",
        load=load_pem_certificates, default_template=DEFAULT_TEMPLATE,
        placeholders=PLACEHOLDERS)
    return ServerAttestorConfig(
        ca_bundle=tuple(c.public_bytes(serialization.Encoding.DER) for c in bundle),
        agent_path_template=template)


def _parse_payload(payload: bytes) -> tuple[list[bytes], bytes, bytes, bytes]:
    doc = pop.load_payload(NAME, payload, max_bytes=MAX_PAYLOAD_BYTES,
                           credential="certificates", kind=list, shape="[...]")
    raw = doc["certificates"]
    if not raw or len(raw) > MAX_CHAIN:
        raise MalformedAttestationError(
            f"{NAME} payload must hold 1 to {MAX_CHAIN} certificates, not {len(raw)}")
    ders = [pop.b64field({"certificates": c}, "certificates", NAME) for c in raw]
    return (ders, *pop.proof_fields(NAME, doc))


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    # The extensions are parsed here, from network input: a repeated extension
    # (DuplicateExtension is no ValueError) or a malformed one refuses the node.
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except (x509.DuplicateExtension, ValueError) as exc:
        raise AttestationError(f"{NAME}: the node certificate's extensions cannot be "
                               f"parsed: {exc}") from None


def _check_leaf(leaf: x509.Certificate) -> None:
    basic = _extension(leaf, x509.BasicConstraints)
    if basic is not None and basic.ca:
        raise AttestationError(f"{NAME}: the node certificate is a CA certificate")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise AttestationError(f"{NAME}: the node certificate's keyUsage does not allow "
                               "digitalSignature")
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise AttestationError(f"{NAME}: the node certificate's extendedKeyUsage does not "
                               "allow clientAuth")


def _ca_basic_constraints(_p: verification.Policy, _c: x509.Certificate,
                          ext: x509.BasicConstraints | None) -> None:
    if ext is None or not ext.ca:
        raise ValueError("issuer is not a CA (basicConstraints cA is false)")


def _ca_key_usage(_p: verification.Policy, _c: x509.Certificate,
                  ext: x509.KeyUsage | None) -> None:
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("issuer keyUsage lacks keyCertSign")


def _verify_path(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                 bundle: Sequence[x509.Certificate], now: dt.datetime) -> list[x509.Certificate]:
    # RFC 5280 path validation without the Web PKI extras (SAN, AKI on every CA),
    # which node certificates from an operator's own CA often lack; the leaf rules
    # that matter here are in _check_leaf.
    agnostic = verification.Criticality.AGNOSTIC
    ca_policy = (verification.ExtensionPolicy.permit_all()
                 .require_present(x509.BasicConstraints, agnostic, _ca_basic_constraints)
                 .may_be_present(x509.KeyUsage, agnostic, _ca_key_usage))
    verifier = (verification.PolicyBuilder()
                .store(verification.Store(list(bundle)))
                .time(now)
                .extension_policies(ca_policy=ca_policy,
                                    ee_policy=verification.ExtensionPolicy.permit_all())
                .build_client_verifier())
    try:
        return list(verifier.verify(leaf, list(intermediates)).chain)
    except verification.VerificationError as exc:
        if now < leaf.not_valid_before_utc:
            raise AttestationError(f"{NAME}: the node certificate is not valid before "
                                   f"{leaf.not_valid_before_utc.isoformat()}") from None
        if now > leaf.not_valid_after_utc:
            raise AttestationError(f"{NAME}: the node certificate expired at "
                                   f"{leaf.not_valid_after_utc.isoformat()}") from None
        raise AttestationError(f"{NAME}: the node certificate does not chain to the "
                               f"configured CA bundle: {exc}") from None


@dataclass
class X509PopVerifier:
    """The server half.

    Attributes:
        trust_domain: the server's trust domain.
        config: the CA bundle and the agent path template.
        nonces: where issued nonces are kept (the datastore).
        clock: the time certificates and nonces are checked at.
    """

    trust_domain: TrustDomain
    config: ServerAttestorConfig
    nonces: pop.NonceStore
    clock: Clock
    _bundle: list[x509.Certificate] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._bundle = self.config.certificates()

    def verify(self, payload: bytes) -> AttestationResult:
        """Verify an agent's answer (see the module docstring).

        Raises:
            MalformedAttestationError: the payload is not x509pop data.
            AttestationError: refused; the message says why.
        """
        ders, binding, nonce, signature = _parse_payload(payload)
        chain: list[x509.Certificate] = []
        for i, der in enumerate(ders):
            try:
                chain.append(x509.load_der_x509_certificate(der))
            except ValueError:
                raise AttestationError(f"{NAME}: certificate {i} of the chain cannot be "
                                       "parsed (truncated or not DER)") from None
        leaf = chain[0]
        _check_leaf(leaf)
        try:
            public_key = leaf.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise AttestationError(f"{NAME}: the node certificate's public key cannot be "
                                   "parsed (an unknown algorithm or a malformed key)") from None
        key = pop.check_key(NAME, public_key)
        now = self.clock.now()
        verified = _verify_path(leaf, chain[1:], self._bundle, now)
        pop.verify_signature(NAME, key, signature,
                             pop.challenge_message(NAME, self.trust_domain, binding, nonce))
        result = self._result(leaf, verified[1:], binding)  # may refuse (the template)
        pop.take_nonce(self.nonces, nonce, attestor=NAME, now=now)
        return result

    def _result(self, leaf: x509.Certificate, cas: Sequence[x509.Certificate],
                binding: bytes) -> AttestationResult:
        cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else None
        san = _extension(leaf, x509.SubjectAlternativeName)
        dns = san.get_values_for_type(x509.DNSName) if san is not None else []
        uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
        serial = format(leaf.serial_number, "x")
        fp = fingerprint(leaf)
        agent = self.config.agent_path_template.render(self.trust_domain, {
            "fingerprint": fp, "subject_cn": cn, "serial": serial,
            "san_dns": dns[0] if dns else None,
        })
        selectors = [Selector(NAME, f"subject:cn:{cn}")] if cn else []
        selectors += [Selector(NAME, f"ca:fingerprint:{fingerprint(c)}") for c in cas]
        selectors += [Selector(NAME, f"san:dns:{d}") for d in dns]
        selectors += [Selector(NAME, f"san:uri:{u}") for u in uris]
        selectors.append(Selector(NAME, f"serialnumber:{serial}"))
        return AttestationResult(agent_id=agent, selectors=tuple(dict.fromkeys(selectors)),
                                 csr_binding=binding)
