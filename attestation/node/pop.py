"""What the proof-of-possession node attestors (x509pop, sshpop) share.

Both are challenge-response: the agent asks the server for a nonce
(``GetAttestationChallenge``), signs it with the private key of its node
credential (an X.509 certificate, an SSH host certificate), and sends the
credential, the nonce and the signature as its ``AttestAgent`` payload. The
server checks the credential, the signature, and that it issued the nonce, for
that attestor, not long ago, and that nobody answered it before.

The signed message is :func:`challenge_message`: a fixed label, the attestor's
name, the trust domain the agent attests to, the SHA-256 of the public key of
the CSR the agent sends with the proof (:func:`csr_binding`), and the nonce. The
trust domain binds the proof to the server: a server of another trust domain
that relays our server's nonce to an agent attesting to it gets a signature our
server refuses. The CSR key binds it to the agent's SVID key: the verifier
returns it as ``AttestationResult.csr_binding`` for AttestAgent to compare with
the CSR it signs. The attestor's name keeps a proof for one attestor from
serving the other.

Nonces live in the datastore (:class:`NonceStore`): one row per issued nonce,
deleted by the answer; see docs/internals.md, "Challenge nonces", for why.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from attestation.node.errors import AttestationError, MalformedAttestationError
from attestation.node.payload import load_json
from identity.errors import InvalidSpiffeIdError
from identity.spiffeid import SpiffeId, TrustDomain

CHALLENGE_ATTESTORS = frozenset({"x509pop", "sshpop"})
"""The node attestors that answer a challenge nonce (GetAttestationChallenge)."""

NONCE_BYTES = 32
NONCE_TTL = dt.timedelta(seconds=60)
"""How long an issued nonce may be answered."""

_LABEL = b"sigil node attestation proof of possession v1\x00"
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,255}$")

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
VerifyingKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

MIN_RSA_BITS = 2048
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_T = TypeVar("_T")


class NonceStore(Protocol):
    """Where issued nonces are kept (the datastore implements it)."""

    def add_attestation_nonce(self, nonce_sha256: str, *, attestor: str,
                              expires_at: dt.datetime, now: dt.datetime) -> None:
        """Record an issued nonce (and drop those that expired before ``now``)."""
        ...

    def take_attestation_nonce(self, nonce_sha256: str, *, attestor: str,
                               now: dt.datetime) -> bool:
        """Delete the nonce if it was issued for ``attestor`` and is unexpired.

        Returns:
            True when this call deleted it; of two concurrent calls at most one
            gets True.
        """
        ...


def nonce_digest(nonce: bytes) -> str:
    """The stored form of a nonce: lowercase hex SHA-256."""
    return hashlib.sha256(nonce).hexdigest()


def issue_nonce(store: NonceStore, *, attestor: str, now: dt.datetime) -> tuple[bytes, dt.datetime]:
    """Make and record a fresh nonce for ``attestor``.

    Returns:
        ``(nonce, expires_at)``.
    """
    nonce = secrets.token_bytes(NONCE_BYTES)
    expires_at = now + NONCE_TTL
    store.add_attestation_nonce(nonce_digest(nonce), attestor=attestor,
                                expires_at=expires_at, now=now)
    return nonce, expires_at


def take_nonce(store: NonceStore, nonce: bytes, *, attestor: str, now: dt.datetime) -> None:
    """Spend a nonce an agent answered.

    Raises:
        AttestationError: not issued for this attestor, expired, or already spent.
    """
    if len(nonce) != NONCE_BYTES or not store.take_attestation_nonce(
            nonce_digest(nonce), attestor=attestor, now=now):
        raise AttestationError(
            f"{attestor}: the challenge nonce was not issued for {attestor}, has expired "
            "or was already used: ask for a new one")


def csr_binding(csr_der: bytes) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo of a PKCS#10 CSR (DER).

    Raises:
        MalformedAttestationError: not a DER CSR.
    """
    try:
        public_key = x509.load_der_x509_csr(csr_der).public_key()
    except ValueError:
        raise MalformedAttestationError("the CSR is not a DER PKCS#10 request") from None
    return hashlib.sha256(public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def check_binding(attestor: str, binding: bytes) -> bytes:
    """A payload's ``csr_key_sha256``: 32 bytes.

    Raises:
        MalformedAttestationError: another length.
    """
    if len(binding) != hashlib.sha256().digest_size:
        raise MalformedAttestationError(f"{attestor} payload: 'csr_key_sha256' must be a "
                                        "SHA-256 (32 bytes)")
    return binding


def challenge_message(attestor: str, trust_domain: TrustDomain, binding: bytes,
                      nonce: bytes) -> bytes:
    """The bytes the agent signs: label, attestor, trust domain, CSR key binding
    (:func:`csr_binding`, 32 bytes), nonce."""
    return b"".join((_LABEL, attestor.encode(), b"\x00", trust_domain.name.encode(),
                     b"\x00", binding, nonce))


def check_key(attestor: str, key: object) -> VerifyingKey:
    """A public key a proof may be made with: RSA of 2048 bits or more, ECDSA on
    P-256, P-384 or P-521, or Ed25519.

    Raises:
        AttestationError: any other key.
    """
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise AttestationError(f"{attestor}: RSA key of {key.key_size} bits is too "
                                   f"weak (at least {MIN_RSA_BITS})")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CURVES):
            raise AttestationError(f"{attestor}: elliptic curve {key.curve.name} is not "
                                   "allowed (P-256, P-384, P-521)")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise AttestationError(f"{attestor}: {type(key).__name__} keys are not supported "
                           "(RSA, ECDSA, Ed25519)")


def signing_key(attestor: str, key: object, what: str) -> SigningKey:
    """``key`` (the agent's ``what``, as its config names it) if it can make a proof.

    Raises:
        MalformedAttestationError: not RSA, ECDSA or Ed25519.
    """
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                      | ed25519.Ed25519PrivateKey):
        raise MalformedAttestationError(f"{attestor}: the {what} must be RSA, ECDSA or Ed25519")
    return key


def sign(key: SigningKey, message: bytes) -> bytes:
    """Sign ``message``: RSA-PSS with SHA-256, ECDSA with SHA-256, or Ed25519."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, _pss(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    return key.sign(message)


def verify_signature(attestor: str, key: VerifyingKey, signature: bytes, message: bytes) -> None:
    """Check a signature made by :func:`sign`.

    Raises:
        AttestationError: it does not verify.
    """
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, _pss(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, message)
    except InvalidSignature:
        raise AttestationError(
            f"{attestor}: the signature over the challenge does not verify with the "
            "certificate's key (wrong key, wrong nonce or another trust domain)") from None


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def make_answer(attestor: str, key: SigningKey, *, trust_domain: TrustDomain,
                nonce: bytes, csr: bytes, credential: Mapping[str, object]) -> tuple[str, bytes]:
    """The agent's ``AttestAgent`` payload: ``credential`` (the attestor's own fields),
    then the CSR key binding, the nonce and the signature over the challenge.

    Returns:
        ``(attestor, payload)``.

    Raises:
        MalformedAttestationError: ``csr`` is not a DER CSR.
    """
    binding = csr_binding(csr)
    signature = sign(key, challenge_message(attestor, trust_domain, binding, nonce))
    return attestor, json.dumps({
        **credential,
        "csr_key_sha256": b64encode(binding),
        "nonce": b64encode(nonce),
        "signature": b64encode(signature),
    }).encode()


# ---- configuration -------------------------------------------------------------------


def check_table(where: str, table: object, keys: Sequence[str]) -> dict[str, Any]:
    """A configuration table that holds none but ``keys``.

    Raises:
        ValueError: not a table, or an unknown key, naming it.
    """
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    for key in table:
        if key not in keys:
            raise ValueError(f"unknown key '{where}.{key}'")
    return table


def parse_server_table(attestor: str, table: object, *, path_key: str, path_help: str,
                       load: Callable[[Path, str], _T], default_template: str,
                       placeholders: frozenset[str]) -> tuple[_T, PathTemplate]:
    """Validate ``[node_attestors.<attestor>]``: the required file ``path_key`` (read
    now with ``load(path, name of the key)``) and the optional ``agent_path_template``.

    Raises:
        ValueError: an unknown key, a missing or bad value, or what ``load`` raises.
    """
    where = f"node_attestors.{attestor}"
    doc = check_table(where, table, (path_key, "agent_path_template"))
    path = doc.get(path_key)
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}.{path_key} is required: {path_help}")
    loaded = load(Path(path), f"{where}.{path_key}")
    template = doc.get("agent_path_template", default_template)
    if not isinstance(template, str):
        raise ValueError(f"{where}.agent_path_template must be a string")
    return loaded, PathTemplate.parse(attestor, template, placeholders)


# ---- payload fields -----------------------------------------------------------------


def load_payload(attestor: str, payload: bytes, *, max_bytes: int, credential: str,
                 kind: type, shape: str) -> dict[str, Any]:
    """The payload's JSON object, whose ``credential`` field is a ``kind``.

    Raises:
        MalformedAttestationError: larger than ``max_bytes``, not JSON, or not an
            object of that shape (``shape`` shows the credential's value).
    """
    if len(payload) > max_bytes:
        raise MalformedAttestationError(f"{attestor} payload is larger than {max_bytes} "
                                        "bytes")
    doc = load_json(payload, attestor)
    if not isinstance(doc, dict) or not isinstance(doc.get(credential), kind):
        raise MalformedAttestationError(
            f'{attestor} payload must be {{"{credential}": {shape}, "csr_key_sha256": ..., '
            '"nonce": ..., "signature": ...}')
    return doc


def proof_fields(attestor: str, doc: Mapping[str, object]) -> tuple[bytes, bytes, bytes]:
    """A payload's ``(csr_key_sha256, nonce, signature)``, decoded.

    Raises:
        MalformedAttestationError: one is missing, not base64, or a binding of
            another length than SHA-256's.
    """
    return (check_binding(attestor, b64field(doc, "csr_key_sha256", attestor)),
            b64field(doc, "nonce", attestor), b64field(doc, "signature", attestor))


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as the payloads carry binary fields."""
    return base64.b64encode(data).decode()


def b64field(doc: Mapping[str, object], key: str, attestor: str) -> bytes:
    """A required base64 field of a payload document.

    Raises:
        MalformedAttestationError: missing, not a string or not base64.
    """
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedAttestationError(f"{attestor} payload: '{key}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedAttestationError(f"{attestor} payload: '{key}' is not base64") from None


# ---- agent path templates ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """An ``agent_path_template``: the agent ID's path after ``/sigil/agent/``.

    ``{name}`` placeholders are replaced by facts of the node's credential. The
    rendered path must start with the attestor's name, so agents of different
    attestors never share an ID.
    """

    attestor: str
    template: str

    @classmethod
    def parse(cls, attestor: str, template: str, placeholders: frozenset[str]) -> PathTemplate:
        """Validate a template at configuration load.

        Raises:
            ValueError: unknown placeholder, bad syntax, or not starting with
                ``<attestor>/``.
        """
        if not template.startswith(f"{attestor}/"):
            raise ValueError(f"agent_path_template {template!r} must start with "
                             f"'{attestor}/'")
        try:
            fields = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"agent_path_template {template!r}: {exc}") from None
        for _text, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in placeholders or spec or conversion:
                raise ValueError(
                    f"agent_path_template {template!r}: unknown placeholder {{{name}}} "
                    f"(known: {', '.join('{' + p + '}' for p in sorted(placeholders))})")
        for text, _name, _spec, _conv in fields:
            if text and not re.fullmatch(r"[A-Za-z0-9._/-]*", text):
                raise ValueError(f"agent_path_template {template!r}: only letters, "
                                 "digits, '.', '_', '-' and '/' may appear outside "
                                 "placeholders")
        parsed = cls(attestor, template)
        try:  # empty segments, '..': refused now rather than at every attestation
            parsed.render(TrustDomain("example.org"), dict.fromkeys(placeholders, "x"))
        except AttestationError as exc:
            raise ValueError(f"agent_path_template {template!r}: {exc}") from None
        return parsed

    def render(self, trust_domain: TrustDomain, values: Mapping[str, str | None]) -> SpiffeId:
        """The agent ID for one credential.

        Raises:
            AttestationError: a placeholder the credential has no value for, or a
                value that cannot be a path segment.
        """
        rendered: list[str] = []
        for text, name, _spec, _conv in string.Formatter().parse(self.template):
            rendered.append(text)
            if name is None:
                continue
            value = values.get(name)
            if value is None:
                raise AttestationError(f"{self.attestor}: agent_path_template needs "
                                       f"{{{name}}}, which the certificate does not have")
            if not _SEGMENT.fullmatch(value) or value in (".", ".."):
                raise AttestationError(
                    f"{self.attestor}: {{{name}}} value {value!r} cannot be a path segment "
                    "of the agent ID (letters, digits, '.', '_', '-')")
            rendered.append(value)
        try:
            return SpiffeId.from_segments(trust_domain, "sigil", "agent",
                                          *"".join(rendered).split("/"))
        except InvalidSpiffeIdError as exc:
            raise AttestationError(f"{self.attestor}: the agent ID is not valid: {exc}") from None
