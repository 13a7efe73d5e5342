"""X.509-SVIDs: the certificate profile we issue, parsing, and chain verification.

References are to the X509-SVID standard (spiffe/spiffe ``standards/X509-SVID.md``)
and RFC 5280. The profile is written once, here:

Leaf (X509-SVID §4, §5):
  - empty subject; the SAN extension therefore critical (RFC 5280 §4.1.2.6);
  - exactly one URI SAN, the SPIFFE ID (which has a path), plus any DNS SANs;
  - basicConstraints CA:FALSE, critical (§4.1);
  - keyUsage digitalSignature (+ keyEncipherment for RSA keys, for RSA key
    transport in TLS 1.2), critical; never keyCertSign/cRLSign (§4.3);
  - extKeyUsage serverAuth + clientAuth (§4.4);
  - subjectKeyIdentifier and authorityKeyIdentifier (RFC 5280 §4.2.1.1-2).

Signing certificate (X509-SVID §4.1, §4.3, §3): CA:TRUE critical, keyUsage
keyCertSign + cRLSign + digitalSignature critical, URI SAN ``spiffe://td`` (no
path), SKI/AKI, a non-empty subject (RFC 5280 §4.1.2.6 requires one for CAs).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.errors import InvalidKeyError, InvalidSpiffeIdError, X509SvidError
from identity.keys import (
    PrivateKey,
    PublicKey,
    check_public_key_strength,
    private_key_to_pem,
    private_key_to_pkcs8_der,
    public_keys_equal,
)
from identity.spiffeid import SpiffeId, TrustDomain

# A CSR is a few hundred bytes; anything this large is not one (DESIGN.md: every
# network input is bounded before use).
MAX_CSR_BYTES = 64 * 1024

MAX_LEAF_TEMPLATES = 50_000
"""Identities a :class:`SvidSigner` keeps a leaf template for: about 0.7 KiB each
(measured with tracemalloc), so at most about 35 MiB. Past it the templates start
over, and each identity's next leaf is validated again, as before templates."""

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)

_DNS_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


# --------------------------------------------------------------------------------
# Encodings
# --------------------------------------------------------------------------------


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """Every PEM block as (type, DER), in order; bad base64 raises ValueError."""
    blocks: list[tuple[str, bytes]] = []
    for match in _PEM_BLOCK.finditer(data):
        body = b"".join(match.group(2).split())
        try:
            der = base64.b64decode(body, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{match.group(1).decode()} block is not base64: {exc}") from None
        blocks.append((match.group(1).decode("ascii"), der))
    return blocks


def load_certificates_pem(data: bytes) -> tuple[x509.Certificate, ...]:
    """Load every ``CERTIFICATE`` PEM block, in order; other block types are skipped.

    Args:
        data: PEM text.

    Returns:
        The certificates (empty when there are PEM blocks but none is a certificate).

    Raises:
        X509SvidError: no PEM block at all, or a certificate block that is not DER.
    """
    try:
        blocks = _pem_blocks(data)
    except ValueError as exc:
        raise X509SvidError(f"cannot parse PEM certificates: {exc}") from None
    if not blocks:
        raise X509SvidError("cannot parse PEM certificates: no PEM blocks found")
    certs = []
    for i, (kind, der) in enumerate(blocks):
        if kind != "CERTIFICATE":
            continue
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            raise X509SvidError(f"PEM block {i} is a malformed certificate: {exc}") from None
    return tuple(certs)


def _split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER values by their outer TLV lengths (X.690 §8.1)."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2 or data[pos] != 0x30:
            raise ValueError(f"no DER SEQUENCE at offset {pos}")
        first = data[pos + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            n = first & 0x7F
            # Indefinite length (0x80) is BER, not DER; 4 length octets is 4 GiB.
            if n == 0 or n > 4 or len(data) - pos < 2 + n:
                raise ValueError(f"bad DER length at offset {pos}")
            length = int.from_bytes(data[pos + 2 : pos + 2 + n], "big")
            header = 2 + n
        end = pos + header + length
        if end > len(data):
            raise ValueError(f"truncated DER value at offset {pos}")
        out.append(data[pos:end])
        pos = end
    return out


def load_certificates_der(data: bytes) -> tuple[x509.Certificate, ...]:
    """Load concatenated DER certificates (the Workload API's encoding).

    Args:
        data: zero or more DER certificates back to back.

    Returns:
        The certificates, in order (empty for empty input).

    Raises:
        X509SvidError: the bytes are not a sequence of DER certificates.
    """
    try:
        return tuple(x509.load_der_x509_certificate(der) for der in _split_der(data))
    except ValueError as exc:
        raise X509SvidError(f"cannot parse DER encoded certificate: {exc}") from None


def certificates_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Encode certificates as concatenated ``CERTIFICATE`` PEM blocks.

    Args:
        certs: the certificates.

    Returns:
        PEM bytes.
    """
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def certificates_to_der(certs: Iterable[x509.Certificate]) -> bytes:
    """Encode certificates as concatenated DER.

    Args:
        certs: the certificates.

    Returns:
        DER bytes, back to back.
    """
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


# --------------------------------------------------------------------------------
# Certificate rules
# --------------------------------------------------------------------------------


_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


def _extension_value(cert: x509.Certificate, ext_type: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(ext_type).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # duplicate or undecodable extension
        raise X509SvidError(f"certificate has malformed extensions: {exc}") from None


def _uri_sans(cert: x509.Certificate) -> list[str]:
    san = _extension_value(cert, x509.SubjectAlternativeName)
    if san is None:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_id_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in a certificate's single URI SAN (X509-SVID §2).

    Args:
        cert: an X.509-SVID (leaf or signing certificate).

    Returns:
        The SPIFFE ID.

    Raises:
        X509SvidError: no URI SAN, more than one, or not a valid SPIFFE ID.
    """
    uris = _uri_sans(cert)
    if not uris:
        raise X509SvidError("cannot get SPIFFE ID: certificate contains no URI SAN")
    # X509-SVID §2: exactly one URI SAN; validators MUST reject more.
    if len(uris) > 1:
        raise X509SvidError(
            f"cannot get SPIFFE ID: certificate contains more than one URI SAN: {uris}"
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as exc:
        raise X509SvidError(f"cannot get SPIFFE ID: {exc}") from None


def validate_leaf(cert: x509.Certificate) -> SpiffeId:
    """Check the X509-SVID leaf rules, in go-spiffe's order, and return the ID.

    Checks: exactly one URI SAN holding a SPIFFE ID with a path (§2, §3); not a CA
    (§4.1); keyUsage present with digitalSignature and without keyCertSign and
    cRLSign (§4.3). Extended key usage is not checked: go-spiffe and py-spiffe do
    not either, and rejecting a peer's otherwise valid SVID over it buys nothing.

    Args:
        cert: the leaf certificate.

    Returns:
        The leaf's SPIFFE ID.

    Raises:
        X509SvidError: naming the rule the leaf breaks.
    """
    spiffe_id = spiffe_id_from_certificate(cert)
    if not spiffe_id.has_path:
        raise X509SvidError(f"leaf certificate SPIFFE ID must have a non-root path: {spiffe_id}")
    bc = _extension_value(cert, x509.BasicConstraints)
    if bc is not None and bc.ca:
        raise X509SvidError("leaf certificate must not have CA flag set to true")
    ku = _extension_value(cert, x509.KeyUsage)
    if ku is None or not ku.digital_signature:
        raise X509SvidError("leaf certificate must have 'digitalSignature' set as key usage")
    if ku.key_cert_sign:
        raise X509SvidError("leaf certificate must not have 'keyCertSign' set as key usage")
    if ku.crl_sign:
        raise X509SvidError("leaf certificate must not have 'cRLSign' set as key usage")
    return spiffe_id


def validate_signing_certificate(cert: x509.Certificate) -> None:
    """Check that a certificate may sign X509-SVIDs (X509-SVID §4.1, §4.3).

    A signing certificate is a CA with keyCertSign. If it carries a SPIFFE URI SAN,
    that ID must have no path (§3). Non-SPIFFE URIs are allowed: an upstream
    enterprise CA in the chain need not be an SVID.

    Args:
        cert: the CA certificate.

    Raises:
        X509SvidError: naming the rule it breaks.
    """
    bc = _extension_value(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise X509SvidError("signing certificate must have CA flag set to true")
    ku = _extension_value(cert, x509.KeyUsage)
    if ku is None or not ku.key_cert_sign:
        raise X509SvidError("signing certificate must have 'keyCertSign' set as key usage")
    for uri in _uri_sans(cert):
        if uri.startswith("spiffe://"):
            try:
                ca_id = SpiffeId.parse(uri)
            except InvalidSpiffeIdError as exc:
                raise X509SvidError(f"signing certificate URI SAN: {exc}") from None
            if ca_id.has_path:
                raise X509SvidError(f"signing certificate SPIFFE ID must have no path, got {ca_id}")


# --------------------------------------------------------------------------------
# The SVID value
# --------------------------------------------------------------------------------


def _check_chain(certs: Sequence[x509.Certificate]) -> SpiffeId:
    if not certs:
        raise X509SvidError("certificate validation failed: no certificates found")
    try:
        spiffe_id = validate_leaf(certs[0])
        for cert in certs[1:]:
            validate_signing_certificate(cert)
    except X509SvidError as exc:
        raise X509SvidError(f"certificate validation failed: {exc}") from None
    return spiffe_id


def _check_key(key: object, leaf: x509.Certificate) -> PrivateKey:
    if key is None:
        raise X509SvidError("private key validation failed: no private key found")
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        # go-spiffe also takes Ed25519; no JWT-SVID algorithm and few TLS peers use it,
        # so Sigil neither issues nor loads it.
        raise X509SvidError(
            f"private key validation failed: unsupported key type {type(key).__name__}"
        )
    if not public_keys_equal(key.public_key(), leaf.public_key()):
        raise X509SvidError(
            "private key validation failed: leaf certificate does not match private key"
        )
    return key


@dataclass(frozen=True)
class X509Svid:
    """An X.509-SVID: the SPIFFE ID, the chain (leaf first) and, when owned, its key.

    Attributes:
        spiffe_id: the leaf's SPIFFE ID.
        cert_chain: leaf first, then intermediates (never required to hold the root).
        private_key: the leaf's key, or None for a peer's SVID.
    """

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey | None = None

    def __post_init__(self) -> None:
        if not self.cert_chain:
            raise X509SvidError("an X509-SVID needs at least one certificate")

    @property
    def leaf(self) -> x509.Certificate:
        """The leaf certificate."""
        return self.cert_chain[0]

    @property
    def expires_at(self) -> dt.datetime:
        """The leaf's notAfter, timezone-aware UTC."""
        return self.leaf.not_valid_after_utc

    @classmethod
    def parse(cls, certs_pem: bytes, key_pem: bytes) -> X509Svid:
        """Parse PEM certificates and a PKCS#8 PEM key by go-spiffe's parse contract.

        Certificates are the ``CERTIFICATE`` blocks in order, the key is the first
        ``PRIVATE KEY`` block; other blocks are skipped, so one file may hold both.
        Validity dates, signatures and chaining are not checked (see
        :func:`verify_chain`).

        Args:
            certs_pem: PEM with the leaf first.
            key_pem: PEM with a PKCS#8 ``PRIVATE KEY`` block.

        Returns:
            The SVID.

        Raises:
            X509SvidError: in go-spiffe's order: unparsable certificate PEM,
                unparsable key PEM, no certificate, leaf rules, signing-certificate
                rules, no key, key not matching the leaf.
        """
        try:
            certs = load_certificates_pem(certs_pem)
        except X509SvidError as exc:
            raise X509SvidError(f"cannot parse PEM encoded certificate: {exc}") from None
        key = _load_pem_pkcs8_key(key_pem)
        spiffe_id = _check_chain(certs)
        return cls(spiffe_id, certs, _check_key(key, certs[0]))

    @classmethod
    def parse_raw(cls, certs_der: bytes, key_der: bytes) -> X509Svid:
        """Parse concatenated DER certificates and a PKCS#8 DER key.

        This is the Workload API encoding (``x509_svid``, ``x509_svid_key``).

        Args:
            certs_der: DER certificates back to back, leaf first.
            key_der: the PKCS#8 DER private key.

        Returns:
            The SVID.

        Raises:
            X509SvidError: as :meth:`parse`.
        """
        certs = load_certificates_der(certs_der)
        try:
            key = serialization.load_der_private_key(key_der, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise X509SvidError(f"cannot parse DER encoded private key: {exc}") from None
        spiffe_id = _check_chain(certs)
        return cls(spiffe_id, certs, _check_key(key, certs[0]))

    def chain_der(self) -> bytes:
        """The chain as concatenated DER, leaf first."""
        return certificates_to_der(self.cert_chain)

    def chain_pem(self) -> bytes:
        """The chain as PEM, leaf first."""
        return certificates_to_pem(self.cert_chain)

    def _require_key(self) -> PrivateKey:
        if self.private_key is None:
            raise X509SvidError(f"X509-SVID {self.spiffe_id} has no private key")
        return self.private_key

    def key_der(self) -> bytes:
        """The private key as PKCS#8 DER.

        Raises:
            X509SvidError: the SVID has no private key.
        """
        return private_key_to_pkcs8_der(self._require_key())

    def key_pem(self) -> bytes:
        """The private key as PKCS#8 PEM.

        Raises:
            X509SvidError: the SVID has no private key.
        """
        return private_key_to_pem(self._require_key())


def _load_pem_pkcs8_key(data: bytes) -> object:
    """The first PKCS#8 ``PRIVATE KEY`` block, or None when there is none."""
    try:
        blocks = _pem_blocks(data)
    except ValueError as exc:
        raise X509SvidError(f"cannot parse PEM encoded private key: {exc}") from None
    if not blocks:
        raise X509SvidError("cannot parse PEM encoded private key: no PEM blocks found")
    for kind, der in blocks:
        # go-spiffe takes PKCS#8 only; 'EC PRIVATE KEY'/'RSA PRIVATE KEY' are skipped.
        if kind == "PRIVATE KEY":
            try:
                return serialization.load_der_private_key(der, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise X509SvidError(f"cannot parse PEM encoded private key: {exc}") from None
    return None


# --------------------------------------------------------------------------------
# Issuing
# --------------------------------------------------------------------------------


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    # Match the hash to the curve's strength (RFC 5758 §3.2 / FIPS 186-5).
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size >= 512:
            return hashes.SHA512()
        if key.curve.key_size >= 384:
            return hashes.SHA384()
    return hashes.SHA256()


class _SerialSource(threading.local):
    """Random serials from the OS's CSPRNG, read 4 KiB at a time per thread.

    One ``getrandom`` per 256 serials instead of one per serial: each read also
    lets the GIL go, and in a server signing on several threads that means a
    thread switch. Bytes read before a fork are never used after it.
    """

    def __init__(self) -> None:
        self.pid = 0
        self.pool = b""
        self.offset = 0

    def take(self) -> int:
        if self.offset >= len(self.pool) or self.pid != os.getpid():
            self.pid = os.getpid()
            self.pool = secrets.token_bytes(4096)
            self.offset = 0
        start = self.offset
        self.offset += 16
        return int.from_bytes(self.pool[start:start + 16], "big")


_serials = _SerialSource()


def _new_serial(serial: int | None) -> int:
    if serial is None:
        # RFC 5280 §4.1.2.2: positive, at most 20 octets; CA/B BR §7.1 asks for 64+
        # bits of randomness. 128 random bits leave collisions out of reach.
        return _serials.take() or 1
    if serial <= 0 or serial.bit_length() > 159:
        raise X509SvidError(f"serial {serial} must be positive and fit in 20 octets")
    return serial


def _utc(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None:
        raise X509SvidError(f"{what} must be timezone-aware, got naive {value}")
    return value.astimezone(dt.UTC)


def _aki_for(
    issuer_cert: x509.Certificate | None, issuer_public: CertificateIssuerPublicKeyTypes
) -> x509.AuthorityKeyIdentifier:
    # RFC 5280 §4.2.1.1: the AKI is the issuer's SKI, so a rotated CA with the same
    # subject is still told apart during path building.
    if issuer_cert is not None:
        ski = _extension_value(issuer_cert, x509.SubjectKeyIdentifier)
        if ski is not None:
            return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public)


def new_ca_certificate(
    *,
    trust_domain: TrustDomain,
    public_key: PublicKey,
    signer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    issuer: x509.Certificate | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """Build and sign a signing (CA) certificate for a trust domain.

    Self-signed when ``issuer`` is None (``signer_key`` must then be the key of
    ``public_key``); otherwise an intermediate signed by ``issuer``, whose notAfter
    clamps ours.

    Args:
        trust_domain: the trust domain; its ID is the URI SAN.
        public_key: the CA's public key.
        signer_key: the key that signs (the CA's own key, or the issuer's).
        not_before: start of validity (aware).
        not_after: end of validity (aware).
        issuer: the issuing CA certificate, or None for a self-signed root.
        serial: a serial number, or None for a random one.

    Returns:
        The certificate, already checked against the signing-certificate rules.

    Raises:
        X509SvidError: bad validity, a signer key that does not match the issuer, or
            an issuer that is not a signing certificate.
        InvalidKeyError: a weak or unsupported key.
    """
    check_public_key_strength(public_key)
    check_public_key_strength(signer_key.public_key())
    not_before, not_after = _utc(not_before, "not_before"), _utc(not_after, "not_after")
    serial = _new_serial(serial)
    if issuer is None:
        if not public_keys_equal(signer_key.public_key(), public_key):
            raise X509SvidError("self-signed CA: signer_key does not match public_key")
        issuer_public: PublicKey = public_key
    else:
        validate_signing_certificate(issuer)
        if not public_keys_equal(signer_key.public_key(), issuer.public_key()):
            raise X509SvidError("signer_key does not match the issuer certificate")
        issuer_public = signer_key.public_key()
        not_after = min(not_after, issuer.not_valid_after_utc)
    if not_after <= not_before:
        raise X509SvidError(f"CA validity is empty: not_before={not_before} not_after={not_after}")
    # A distinct subject per CA (the serial) keeps rotated CAs apart in logs and for
    # name chaining; RFC 5280 §4.1.2.6 requires CAs to have a non-empty subject.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, f"{serial:x}"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id_string())]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki_for(issuer, issuer_public), critical=False)
    )
    cert = builder.sign(signer_key, _hash_for(signer_key))
    validate_signing_certificate(cert)
    _check_signed_by(cert, issuer if issuer is not None else cert)
    return cert


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise X509SvidError(
            f"issued certificate does not verify against its issuer: {exc}"
        ) from None


def _check_dns_name(name: str) -> None:
    labels = name.split(".")
    if labels and labels[0] == "*":  # one leading wildcard label (RFC 6125 §6.4.3)
        labels = labels[1:]
    if not labels or len(name) > 253 or not all(_DNS_LABEL.match(lab) for lab in labels):
        raise X509SvidError(f"invalid DNS name {name!r}")


class SvidSigner:
    """Signs X509-SVID leaves (the profile in the module docstring) under one CA.

    The CA is checked once, when the signer is made: it may sign (CA flag,
    keyCertSign, a SPIFFE ID without path if it has one), ``ca_key`` is its key, and
    the parts every leaf shares (issuer, constraints, key usage, AKI) are built
    then.

    The rest of a leaf is fixed by its identity (the SPIFFE ID, the DNS names and
    whether the key is RSA): the first time an identity is signed for, its ID and
    names are checked and its SAN extension encoded, and the leaf that comes out is
    validated as a relying party would (:func:`validate_leaf`). That template,
    validated, then serves every later leaf of the identity, which differs from the
    first only in its key, serial and validity: those are still checked per leaf
    (the key's strength; the validity clamped into the CA's), the leaf is not
    parsed again. A new CA slot is a new signer, so each template is validated
    once per identity and CA.

    Args:
        ca_cert: the signing certificate.
        ca_key: its private key.
        verify_signatures: also verify each leaf's signature against ``ca_cert``.
            Worth it where the key lives outside this process (an HSM through
            PKCS#11), so a faulty signer is caught before anyone gets its output.
            For a key in this process, whose signature OpenSSL computes, the
            check doubles the public-key work per SVID and catches nothing the
            agent does not: the agent verifies every SVID it receives against the
            bundle before serving it.

    Raises:
        X509SvidError: the CA may not sign, or the key does not match it.
    """

    def __init__(self, ca_cert: x509.Certificate, ca_key: PrivateKey, *,
                 verify_signatures: bool = True) -> None:
        validate_signing_certificate(ca_cert)
        if not public_keys_equal(ca_key.public_key(), ca_cert.public_key()):
            raise X509SvidError("ca_key does not match ca_cert")
        self._trust_domains = tuple(SpiffeId.parse(uri).trust_domain
                                    for uri in _uri_sans(ca_cert) if uri.startswith("spiffe://"))
        self.ca_certificate = ca_cert
        self._ca_key = ca_key
        self._hash = _hash_for(ca_key)
        self._verify = verify_signatures
        self._not_before = ca_cert.not_valid_before_utc
        self._not_after = ca_cert.not_valid_after_utc
        self._aki = _aki_for(ca_cert, ca_key.public_key())
        self._base: dict[bool, x509.CertificateBuilder] = {}
        self._templates: dict[tuple[SpiffeId, tuple[str, ...], bool], _LeafTemplate] = {}

    def _base_for(self, rsa_leaf: bool) -> x509.CertificateBuilder:
        # What every leaf with this kind of key shares; RSA key transport (TLS 1.2
        # RSA kx) needs keyEncipherment, EC keys have no such use (RFC 5480 §3).
        base = self._base.get(rsa_leaf)
        if base is None:
            shared: list[tuple[x509.ExtensionType, bool]] = [
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (_leaf_key_usage(rsa_leaf), True),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                        ExtendedKeyUsageOID.CLIENT_AUTH]), False),
                (self._aki, False),
            ]
            base = x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(
                self.ca_certificate.subject)
            for ext, critical in shared:
                # Encoded once, here, by cryptography; every leaf then carries the
                # same bytes without converting the extension again.
                base = base.add_extension(
                    x509.UnrecognizedExtension(ext.oid, ext.public_bytes()), critical=critical)
            self._base[rsa_leaf] = base
        return base

    def sign(
        self,
        *,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        not_before: dt.datetime,
        not_after: dt.datetime,
        dns_names: Sequence[str] = (),
        serial: int | None = None,
    ) -> x509.Certificate:
        """Build, sign and validate one leaf.

        Validity is clamped into the CA's, so the leaf never outlives its issuer
        (X509-SVID §5.2 path validation would reject it then anyway).

        Args:
            spiffe_id: the workload's ID; must have a path and belong to the CA's
                trust domain when the CA names one.
            public_key: the workload's public key (from its CSR).
            not_before: start of validity (aware).
            not_after: end of validity (aware); clamped to the CA's notAfter.
            dns_names: DNS SANs to add.
            serial: a serial number, or None for a random 128-bit one.

        Raises:
            X509SvidError: a root ID, a foreign trust domain, bad DNS names, an
                empty lifetime, or a leaf that fails validation.
            InvalidKeyError: a weak or unsupported workload key.
        """
        template = self._template_for(spiffe_id, tuple(dns_names),
                                      isinstance(public_key, rsa.RSAPublicKey))
        check_public_key_strength(public_key)
        not_before = max(_utc(not_before, "not_before"), self._not_before)
        not_after = min(_utc(not_after, "not_after"), self._not_after)
        if not_after <= not_before:
            raise X509SvidError(
                f"SVID lifetime is empty after clamping to the CA: "
                f"not_before={not_before} not_after={not_after}"
            )
        cert = (
            template.builder
            .public_key(public_key)
            .serial_number(_new_serial(serial))
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False)
            .sign(self._ca_key, self._hash)
        )
        if not template.validated:
            # Build, sign, then validate (SPIRE's habit): the checks a relying party
            # runs, on the first leaf of this identity under this CA.
            if validate_leaf(cert) != spiffe_id:
                raise X509SvidError("issued certificate carries the wrong SPIFFE ID")
            if cert.not_valid_after_utc > self._not_after:
                raise X509SvidError("issued certificate outlives its CA")
            template.validated = True
        if self._verify:
            _check_signed_by(cert, self.ca_certificate)
        return cert

    def _template_for(self, spiffe_id: SpiffeId, dns_names: tuple[str, ...],
                      rsa_leaf: bool) -> _LeafTemplate:
        """The builder of an identity's leaves, its ID and names checked once."""
        key = (spiffe_id, dns_names, rsa_leaf)
        template = self._templates.get(key)
        if template is not None:
            return template
        if not spiffe_id.has_path:
            raise X509SvidError(f"an X509-SVID leaf needs an ID with a path, got {spiffe_id}")
        for ca_td in self._trust_domains:
            if not spiffe_id.is_member_of(ca_td):
                raise X509SvidError(
                    f"CA of trust domain {ca_td} cannot issue {spiffe_id} (X509-SVID §3)"
                )
        for name in dns_names:
            _check_dns_name(name)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        sans.extend(x509.DNSName(n) for n in dict.fromkeys(dns_names))
        san = x509.SubjectAlternativeName(sans)
        template = _LeafTemplate(self._base_for(rsa_leaf).add_extension(
            # Empty subject, so the SAN MUST be critical (RFC 5280 §4.1.2.6).
            x509.UnrecognizedExtension(san.oid, san.public_bytes()), critical=True))
        if len(self._templates) >= MAX_LEAF_TEMPLATES:
            self._templates.clear()  # a bound, not a policy: templates are cheap to remake
        self._templates[key] = template
        return template


@dataclass
class _LeafTemplate:
    """What every leaf of one identity under one CA shares, and whether a leaf built
    from it has passed :func:`validate_leaf`."""

    builder: x509.CertificateBuilder
    validated: bool = False


def _leaf_key_usage(rsa_leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_leaf,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def new_svid_certificate(
    *,
    spiffe_id: SpiffeId,
    public_key: PublicKey,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    dns_names: Sequence[str] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """Build, sign and validate one X509-SVID leaf, signature check included.

    A one-off :class:`SvidSigner`; a CA that signs many leaves keeps one instead.

    Raises:
        X509SvidError: see :class:`SvidSigner` and :meth:`SvidSigner.sign`.
        InvalidKeyError: a weak or unsupported workload key.
    """
    return SvidSigner(ca_cert, ca_key).sign(
        spiffe_id=spiffe_id, public_key=public_key, not_before=not_before,
        not_after=not_after, dns_names=dns_names, serial=serial,
    )


# --------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------


def _ca_basic_constraints(
    _policy: verification.Policy, _cert: x509.Certificate, ext: x509.BasicConstraints | None
) -> None:
    if ext is None or not ext.ca:
        raise ValueError("issuer is not a CA (basicConstraints cA is false)")


def _ca_key_usage(
    _policy: verification.Policy, _cert: x509.Certificate, ext: x509.KeyUsage | None
) -> None:
    # RFC 5280 §4.2.1.3: keyUsage may be absent on a CA; if present it must allow
    # certificate signing.
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("issuer keyUsage lacks keyCertSign")


def _extension_policies() -> tuple[verification.ExtensionPolicy, verification.ExtensionPolicy]:
    """RFC 5280 rules without the Web PKI extras.

    The Web PKI defaults demand things SPIFFE does not (AKI on every CA, serverAuth
    or clientAuth EKU, SAN on the leaf). The CA policy keeps what RFC 5280 §6.1.4
    requires of an issuer (cA true, keyCertSign when keyUsage is present); the leaf
    policy checks nothing, because :func:`validate_leaf` holds the SPIFFE leaf rules.
    """
    criticality = verification.Criticality.AGNOSTIC
    ca_policy = (
        verification.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, criticality, _ca_basic_constraints)
        .may_be_present(x509.KeyUsage, criticality, _ca_key_usage)
    )
    return ca_policy, verification.ExtensionPolicy.permit_all()


class X509Authorities(Protocol):
    """What :func:`verify_chain` reads of a bundle (an :class:`identity.bundle.Bundle`)."""

    @property
    def x509_authorities(self) -> Sequence[x509.Certificate]:
        """The CA certificates that X509-SVIDs of the trust domain chain to."""
        ...


class X509AuthoritySource(Protocol):
    """Where :func:`verify_chain` finds the authorities of a trust domain: any
    :class:`identity.bundle.X509BundleSource` is one. Declared here, structurally,
    so that this module does not import bundle.py (which imports this one)."""

    def bundle_for(self, trust_domain: TrustDomain) -> X509Authorities | None:
        """The bundle of ``trust_domain``, or None when there is none."""
        ...


def verify_chain(
    chain: Sequence[x509.Certificate],
    bundles: X509AuthoritySource,
    *,
    now: dt.datetime,
) -> SpiffeId:
    """Verify an X509-SVID chain against the bundle of the leaf's trust domain.

    X509-SVID §5: RFC 5280 path validation from the leaf, through ``chain[1:]``, to
    the X.509 authorities of the bundle of the leaf's own trust domain only; bundles
    are never pooled across trust domains (Trust Domain and Bundle §6.4). Then the
    leaf rules of :func:`validate_leaf`.

    Args:
        chain: leaf first, then intermediates.
        bundles: where to find the leaf trust domain's bundle.
        now: the verification time (aware).

    Returns:
        The leaf's SPIFFE ID.

    Raises:
        X509SvidError: naming what failed (leaf rules, no bundle, no authorities,
            expiry, unknown authority, a bad issuer, an unknown critical extension).
    """
    if not chain:
        raise X509SvidError("cannot verify X509-SVID: empty certificate chain")
    leaf = chain[0]
    spiffe_id = validate_leaf(leaf)
    td = spiffe_id.trust_domain
    bundle = bundles.bundle_for(td)
    if bundle is None:
        raise X509SvidError(f"cannot verify {spiffe_id}: no X.509 bundle for trust domain {td}")
    if not bundle.x509_authorities:
        raise X509SvidError(
            f"cannot verify {spiffe_id}: the bundle of trust domain {td} has no X.509 authorities"
        )
    now = _utc(now, "now")
    ca_policy, ee_policy = _extension_policies()
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(bundle.x509_authorities)))
        .time(now)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        # Also rejects unknown critical extensions (RFC 5280 §4.2), even under the
        # permissive extension policies.
        verifier.verify(leaf, list(chain[1:]))
    except verification.VerificationError as exc:
        if not (leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc):
            raise X509SvidError(
                f"cannot verify {spiffe_id}: leaf certificate is not valid at {now.isoformat()} "
                f"(valid {leaf.not_valid_before_utc.isoformat()} to "
                f"{leaf.not_valid_after_utc.isoformat()})"
            ) from None
        raise X509SvidError(
            f"cannot verify {spiffe_id} against the bundle of {td}: {exc}"
        ) from None
    return spiffe_id


# --------------------------------------------------------------------------------
# CSRs
# --------------------------------------------------------------------------------


def new_csr(key: PrivateKey) -> bytes:
    """A DER PKCS#10 CSR proving possession of ``key``, with no identity in it.

    The server takes identity from the registration entry, never from the CSR, so
    the CSR carries only the public key and the proof-of-possession signature.

    Args:
        key: the private key.

    Returns:
        The CSR in DER.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, _hash_for(key))
    )
    return csr.public_bytes(serialization.Encoding.DER)


def parse_csr(der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER CSR, check its signature and its key's strength.

    Args:
        der: the PKCS#10 CSR in DER.

    Returns:
        The CSR; only its public key is meant to be used.

    Raises:
        X509SvidError: too large, not DER, a bad signature, or a weak or
            unsupported key.
    """
    return _checked_csr(der)[0]


def csr_public_key(der: bytes) -> PublicKey:
    """The public key of a DER CSR, after the checks of :func:`parse_csr`.

    Raises:
        X509SvidError: as :func:`parse_csr`.
    """
    return _checked_csr(der)[1]


def _checked_csr(der: bytes) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    if len(der) > MAX_CSR_BYTES:
        raise X509SvidError(f"CSR of {len(der)} bytes exceeds the limit of {MAX_CSR_BYTES}")
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise X509SvidError(f"cannot parse CSR: {exc}") from None
    try:
        signature_ok = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise X509SvidError(f"cannot check CSR: {exc}") from None
    if not signature_ok:
        raise X509SvidError("CSR signature is invalid")
    try:
        check_public_key_strength(public_key)
    except InvalidKeyError as exc:
        raise X509SvidError(f"CSR key rejected: {exc}") from exc
    return csr, public_key  # type: ignore[return-value]  # checked: EC or RSA
