"""Revoked SVIDs: what an operator cut off before expiry, and the signed list of it.

A revocation names X.509-SVIDs by serial number, or by SPIFFE ID together with a
notBefore cutoff (every SVID of that ID issued up to the revocation; issuance then
records nothing per SVID), and JWT-SVIDs by ``jti`` or by signing key id. Servers
hand revocations to agents in syncs; verifiers that are not agents fetch the
signed list (:func:`sign_revocation_list`, :func:`verify_revocation_list`), a JWS
signed with a JWT key of the trust domain's bundle (format: docs/internals.md,
"Revocations").
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from identity.bundle import Bundle
from identity.errors import InvalidValueError, JwtSvidError
from identity.jwtsvid import ALLOWED_ALGORITHMS, default_algorithm
from identity.keys import JwtPrivateKey

X509_SERIAL = "x509_serial"
X509_SPIFFE_ID = "x509_spiffe_id"
JWT_ID = "jwt_id"
JWT_KEY_ID = "jwt_key_id"
KINDS: frozenset[str] = frozenset({X509_SERIAL, X509_SPIFFE_ID, JWT_ID, JWT_KEY_ID})

LIST_TYPE = "sigil-revocations+jwt"
"""The ``typ`` header of a signed revocation list: never mistaken for a JWT-SVID."""
MAX_LIST_BYTES = 16 * 1024 * 1024
MAX_VALUE_LENGTH = 2048
# RFC 5280 §4.1.2.2: a serial is a positive integer of at most 20 octets.
_SERIAL_TEXT = re.compile(r"(?:0x)?([0-9a-f]{2}(?::[0-9a-f]{2})+|[0-9a-f]{1,40})")


def parse_serial(text: str) -> int:
    """A serial number as hex, as ``openssl x509 -serial`` prints it.

    Accepts plain hex (``4f1a...``, optionally ``0x``-prefixed) or colon-separated
    octets (``4f:1a:...``), any case.

    Raises:
        InvalidValueError: not hex, zero, or longer than 20 octets.
    """
    found = _SERIAL_TEXT.fullmatch(text.strip().lower())
    if found is None:
        raise InvalidValueError(
            f"serial {text!r} is not a hex serial number (e.g. 4f1a09 or 4f:1a:09)")
    value = int(found.group(1).replace(":", ""), 16)
    if value <= 0 or value.bit_length() > 160:
        raise InvalidValueError(f"serial {text!r} is not a positive number of at most 20 octets")
    return value


def serial_text(serial: int) -> str:
    """The canonical text of a serial: lowercase hex without leading zeros."""
    return format(serial, "x")


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revocation.

    Attributes:
        id: its revision; later revocations have larger ids.
        kind: one of :data:`KINDS`.
        value: the serial (:func:`serial_text`), SPIFFE ID, ``jti`` or key id.
        not_before_max: for :data:`X509_SPIFFE_ID`: SVIDs whose notBefore is at or
            before this (unix seconds) are revoked; None otherwise.
        expires_at: unix seconds after which nothing it names can still be valid
            (it may be dropped then); None: kept.
        created_at: unix seconds.
    """

    id: int
    kind: str
    value: str
    not_before_max: int | None = None
    expires_at: int | None = None
    created_at: int = 0

    def to_json(self) -> dict[str, Any]:
        """The list document's form of it (see docs/internals.md)."""
        doc: dict[str, Any] = {"id": self.id, "kind": self.kind, "value": self.value,
                               "created_at": self.created_at}
        if self.not_before_max is not None:
            doc["not_before_max"] = self.not_before_max
        if self.expires_at is not None:
            doc["expires_at"] = self.expires_at
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Revocation:
        """Parse one element of a list document.

        Raises:
            InvalidValueError: a missing or mistyped field, an unknown kind.
        """
        def integer(name: str, *, optional: bool) -> int | None:
            value = doc.get(name)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidValueError(f"revocation {name} must be an integer, got {value!r}")
            return value

        kind, value = doc.get("kind"), doc.get("value")
        if kind not in KINDS:
            raise InvalidValueError(f"unknown revocation kind {kind!r}")
        if not isinstance(value, str) or not value or len(value) > MAX_VALUE_LENGTH:
            raise InvalidValueError(f"revocation value must be a non-empty string, got {value!r}")
        return cls(id=integer("id", optional=False) or 0, kind=str(kind), value=value,
                   not_before_max=integer("not_before_max", optional=True),
                   expires_at=integer("expires_at", optional=True),
                   created_at=integer("created_at", optional=True) or 0)


@dataclass(slots=True)
class RevocationSet:
    """The revocations a verifier holds, indexed for checks."""

    serials: set[str] = field(default_factory=set)
    # SPIFFE ID -> the largest notBefore cutoff revoked for it.
    spiffe_ids: dict[str, int] = field(default_factory=dict)
    jwt_ids: set[str] = field(default_factory=set)
    key_ids: set[str] = field(default_factory=set)
    _all: dict[int, Revocation] = field(default_factory=dict)

    def add(self, revocations: Iterable[Revocation]) -> None:
        """Take these revocations in (again: no effect)."""
        for r in revocations:
            self._all[r.id] = r
            self._index(r)

    def _index(self, r: Revocation) -> None:
        if r.kind == X509_SERIAL:
            self.serials.add(r.value)
        elif r.kind == X509_SPIFFE_ID and r.not_before_max is not None:
            held = self.spiffe_ids.get(r.value)
            if held is None or r.not_before_max > held:
                self.spiffe_ids[r.value] = r.not_before_max
        elif r.kind == JWT_ID:
            self.jwt_ids.add(r.value)
        elif r.kind == JWT_KEY_ID:
            self.key_ids.add(r.value)

    def replace(self, revocations: Iterable[Revocation]) -> None:
        """Hold exactly these revocations."""
        self._all.clear()
        self.serials, self.spiffe_ids, self.jwt_ids, self.key_ids = set(), {}, set(), set()
        self.add(revocations)

    def prune(self, now: dt.datetime) -> int:
        """Drop revocations past their ``expires_at``; returns how many."""
        ts = now.timestamp()
        kept = [r for r in self._all.values() if r.expires_at is None or r.expires_at > ts]
        dropped = len(self._all) - len(kept)
        if dropped:
            self.replace(kept)
        return dropped

    def __len__(self) -> int:
        return len(self._all)

    def all(self) -> list[Revocation]:
        """Every revocation held, by id."""
        return [self._all[i] for i in sorted(self._all)]

    def x509_revoked(self, *, serial: int, spiffe_id: str, not_before: dt.datetime) -> bool:
        """Whether the X.509-SVID with this serial, ID and notBefore is revoked."""
        if serial_text(serial) in self.serials:
            return True
        cutoff = self.spiffe_ids.get(spiffe_id)
        return cutoff is not None and math.floor(not_before.timestamp()) <= cutoff

    def jwt_revoked(self, *, jwt_id: str | None, key_id: str | None) -> bool:
        """Whether a JWT-SVID with this ``jti`` or signed by this key id is revoked."""
        return ((jwt_id is not None and jwt_id in self.jwt_ids)
                or (key_id is not None and key_id in self.key_ids))


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A verified revocation list.

    Attributes:
        trust_domain: whose server issued it.
        version: the highest revocation id it includes; a newer list has a larger one.
        issued_at: unix seconds.
        revocations: every unexpired revocation, by id.
    """

    trust_domain: str
    version: int
    issued_at: int
    revocations: tuple[Revocation, ...]


def sign_revocation_list(
    *, trust_domain: str, version: int, issued_at: dt.datetime,
    revocations: Iterable[Revocation], key: JwtPrivateKey, key_id: str,
) -> str:
    """Sign a revocation list as a JWS (compact) with a JWT key of the bundle.

    Args:
        trust_domain: the trust domain name (the ``iss`` and ``sub`` of the list).
        version: the highest revocation id included.
        issued_at: aware.
        revocations: the list.
        key: the server's active JWT signing key.
        key_id: its kid in the bundle.

    Returns:
        ``header.payload.signature``; header ``{alg, kid, typ: sigil-revocations+jwt}``.
    """
    claims = {
        "iss": trust_domain,
        "version": version,
        "iat": math.floor(issued_at.timestamp()),
        "revocations": [r.to_json() for r in revocations],
    }
    signing_key: Any = key  # ML-DSA keys pass through PyJWT untouched, as for JWT-SVIDs
    return jwt.encode(claims, signing_key, algorithm=default_algorithm(key),
                      headers={"kid": key_id, "typ": LIST_TYPE})


def verify_revocation_list(token: str, *, bundle: Bundle) -> RevocationList:
    """Verify a signed revocation list with the trust domain's bundle and parse it.

    Raises:
        JwtSvidError: not a list of this trust domain, an unknown key, a bad
            signature or a malformed document.
    """
    if not isinstance(token, str) or len(token) > MAX_LIST_BYTES or token.count(".") != 2:
        raise JwtSvidError("revocation list is not a JWS compact serialization")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise JwtSvidError(f"cannot parse revocation list header: {exc}") from None
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALLOWED_ALGORITHMS:
        raise JwtSvidError(f"revocation list algorithm {alg!r} is not allowed")
    if header.get("typ") != LIST_TYPE:
        raise JwtSvidError(f"header typ {header.get('typ')!r} is not {LIST_TYPE}")
    authority = bundle.jwt_authority(kid) if isinstance(kid, str) and kid else None
    if authority is None:
        raise JwtSvidError(f"no JWT authority {kid!r} in the bundle of {bundle.trust_domain}")
    verify_key: Any = authority.public_key
    try:
        claims = jwt.decode(token, verify_key, algorithms=[str(alg)],
                            options={"verify_exp": False, "verify_iat": False,
                                     "verify_nbf": False, "verify_aud": False,
                                     "verify_iss": False, "require": []})
    except jwt.InvalidSignatureError:
        raise JwtSvidError(
            f"revocation list signature does not verify with {kid!r}") from None
    except jwt.PyJWTError as exc:
        raise JwtSvidError(f"revocation list failed verification: {exc}") from None
    if claims.get("iss") != bundle.trust_domain.name:
        raise JwtSvidError(
            f"revocation list of {claims.get('iss')!r}, not of {bundle.trust_domain}")
    version, issued_at, items = claims.get("version"), claims.get("iat"), claims.get("revocations")
    if not isinstance(version, int) or not isinstance(issued_at, int) or not isinstance(
            items, list):
        raise JwtSvidError("revocation list lacks version, iat or revocations")
    if not all(isinstance(i, dict) for i in items):
        raise JwtSvidError("revocation list is malformed: revocations must be objects")
    try:
        parsed = tuple(Revocation.from_json(i) for i in items)
    except InvalidValueError as exc:
        raise JwtSvidError(f"revocation list is malformed: {exc}") from None
    return RevocationList(trust_domain=bundle.trust_domain.name, version=version,
                          issued_at=issued_at, revocations=parsed)


def list_json_size(revocations: Iterable[Revocation]) -> int:
    """Bytes of the list document's JSON (before base64url and signing)."""
    return len(json.dumps([r.to_json() for r in revocations], separators=(",", ":")))
