"""Trust bundles: the X.509 authorities and JWT keys of one trust domain.

The document format is the SPIFFE bundle, an RFC 7517 JWK Set with SPIFFE members
(SPIFFE Trust Domain and Bundle §4; X509-SVID §6; JWT-SVID §6). Where go-spiffe is
stricter than the standard we follow the standard, and say so at the spot:

- a key with a missing or unknown ``use`` or ``kty`` is skipped (§4.1.3, §4.2.1,
  §4.2.2 "MUST ignore the entire JWK element");
- an ``x509-svid`` entry with several ``x5c`` certificates contributes the first,
  and one with none is skipped (go-spiffe rejects the whole bundle for both).

A bundle never carries its trust domain's name, so a :class:`Bundle` is always the
pair (trust domain, contents) and bundles of different trust domains never merge.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError as JwtInvalidKeyError

from identity import mldsa
from identity.errors import BundleError, InvalidKeyError, InvalidSpiffeIdError, X509SvidError
from identity.keys import JwtPublicKey, check_jwt_public_key, public_keys_equal
from identity.spiffeid import TrustDomain
from identity.x509svid import (
    certificates_to_der,
    certificates_to_pem,
    load_certificates_der,
    load_certificates_pem,
)

USE_X509_SVID = "x509-svid"
USE_JWT_SVID = "jwt-svid"
# WIT-SVID §6.1: WIT-SVID signing keys are published with this use.
USE_WIT_SVID = "wit-svid"

# Bounds a foreign bundle document before it is parsed (DESIGN.md: every network
# input is bounded). Thousands of authorities fit comfortably.
MAX_BUNDLE_BYTES = 4 * 1024 * 1024

# X.509 authorities are EC or RSA certificates. JWT authorities may also be ML-DSA
# keys: kty "AKP" whose "alg" is ML-DSA-44/65/87 (draft-ietf-cose-dilithium-11 §3).
_KNOWN_KTY = frozenset({"EC", "RSA"})
_KNOWN_JWT_KTY = _KNOWN_KTY | {mldsa.KTY}
# Members of a JWK that carry private key material (RFC 7518 §6.2.2, §6.3.2; the
# AKP seed of draft-ietf-cose-dilithium-11 §4).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "priv"})


@dataclass(frozen=True)
class JwtAuthority:
    """A JWT-SVID signing key of a trust domain.

    Attributes:
        key_id: the ``kid`` tokens name it by (never empty).
        public_key: the verification key.
        expires_at: when the server stops trusting it, if known (not part of the
            SPIFFE bundle document).
    """

    key_id: str
    public_key: JwtPublicKey
    expires_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        if not self.key_id:
            raise BundleError("a JWT authority needs a non-empty key ID")


def _dedupe_certs(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        seen.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
    # A canonical order (oldest first, then by DER) makes to_jwks() and equality
    # independent of the order authorities were added or read from storage.
    return tuple(
        sorted(
            seen.values(),
            key=lambda c: (c.not_valid_before_utc, c.public_bytes(serialization.Encoding.DER)),
        )
    )


def _dedupe_jwt(authorities: Iterable[JwtAuthority]) -> tuple[JwtAuthority, ...]:
    by_kid: dict[str, JwtAuthority] = {}
    for auth in authorities:
        prior = by_kid.get(auth.key_id)
        if prior is not None and not public_keys_equal(prior.public_key, auth.public_key):
            # Two keys under one kid: a validator could not tell which one signed.
            raise BundleError(f"two different JWT authorities share key ID {auth.key_id!r}")
        if prior is None:
            by_kid[auth.key_id] = auth
    return tuple(by_kid[kid] for kid in sorted(by_kid))


@dataclass(frozen=True)
class Bundle:
    """The trust bundle of one trust domain.

    Authorities are de-duplicated and kept in a canonical order (X.509 by notBefore,
    JWT by kid), so two bundles with the same contents are equal and serialise to
    the same bytes.

    Attributes:
        trust_domain: whose bundle this is.
        x509_authorities: CA certificates that X509-SVIDs chain to.
        jwt_authorities: keys JWT-SVIDs are signed with.
        wit_authorities: keys WIT-SVIDs are signed with (``use: wit-svid``,
            WIT-SVID §6); none means the trust domain issues no WIT-SVIDs.
        sequence_number: ``spiffe_sequence`` (Trust Domain and Bundle §4.1.1).
        refresh_hint: ``spiffe_refresh_hint`` in seconds (§4.1.2).
    """

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: tuple[JwtAuthority, ...] = ()
    sequence_number: int | None = None
    refresh_hint: int | None = None
    wit_authorities: tuple[JwtAuthority, ...] = ()
    _by_kid: dict[str, JwtAuthority] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "x509_authorities", _dedupe_certs(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", _dedupe_jwt(self.jwt_authorities))
        object.__setattr__(self, "_by_kid", {a.key_id: a for a in self.jwt_authorities})
        object.__setattr__(self, "wit_authorities", _dedupe_jwt(self.wit_authorities))
        shared = {a.key_id for a in self.wit_authorities} & self._by_kid.keys()
        if shared:
            # WIT-SVID §6.1: a kid is unique in the bundle; no jwt-svid key and
            # wit-svid key may share one.
            raise BundleError(f"jwt-svid and wit-svid keys share key ID {sorted(shared)[0]!r}")
        for name, value in (
            ("sequence_number", self.sequence_number),
            ("refresh_hint", self.refresh_hint),
        ):
            if value is not None and (isinstance(value, bool) or value < 0):
                raise BundleError(f"{name} must be a non-negative integer, got {value!r}")

    # -- lookups ------------------------------------------------------------------

    def jwt_authority(self, kid: str) -> JwtAuthority | None:
        """The JWT authority with key ID ``kid``, or None.

        Args:
            kid: the key ID from a token header.

        Returns:
            The authority, or None.
        """
        return self._by_kid.get(kid)

    def wit_authority(self, kid: str) -> JwtAuthority | None:
        """The WIT authority (a ``use: wit-svid`` key) with key ID ``kid``, or None.

        Args:
            kid: the key ID from a WIT-SVID header.

        Returns:
            The authority, or None.
        """
        for auth in self.wit_authorities:
            if auth.key_id == kid:
                return auth
        return None

    def without_ml_dsa_keys(self) -> Bundle:
        """This bundle without its ML-DSA (``kty: AKP``) JWT and WIT authorities.

        For readers that refuse a whole bundle over one key type they do not
        know (go-spiffe and SPIRE, py-spiffe): EC and RSA keys and every X.509
        authority stay, with the same sequence number and refresh hint.

        Returns:
            The bundle itself when it holds no ML-DSA key, else a copy without them.
        """
        jwt_keys = tuple(a for a in self.jwt_authorities if not mldsa.is_public_key(a.public_key))
        wit_keys = tuple(a for a in self.wit_authorities if not mldsa.is_public_key(a.public_key))
        if (len(jwt_keys), len(wit_keys)) == (len(self.jwt_authorities),
                                              len(self.wit_authorities)):
            return self
        return replace(self, jwt_authorities=jwt_keys, wit_authorities=wit_keys)

    def bundle_for(self, trust_domain: TrustDomain) -> Bundle | None:
        """This bundle if it is ``trust_domain``'s, else None (a one-bundle source).

        Args:
            trust_domain: the trust domain asked for.

        Returns:
            self or None.
        """
        return self if trust_domain == self.trust_domain else None

    # -- SPIFFE bundle document -----------------------------------------------------

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain, data: bytes | str | Mapping[str, Any]) -> Bundle:
        """Parse a SPIFFE bundle document (Trust Domain and Bundle §4).

        Args:
            trust_domain: whose bundle it is (a document never says).
            data: the JSON text, or an already decoded JSON object.

        Returns:
            The bundle.

        Raises:
            BundleError: bad JSON, duplicate members, ``keys`` missing, a bad
                ``spiffe_sequence``/``spiffe_refresh_hint``, a jwt-svid key without
                ``kid``, or a key or certificate that does not parse.
        """
        doc = _load_json(data)
        keys = doc.get("keys")
        # §4.1.3: "keys" MUST be present ([] is allowed: every key was revoked).
        if keys is None:
            raise BundleError("bundle has no 'keys' member")
        if not isinstance(keys, list):
            raise BundleError("bundle 'keys' must be an array")
        x509_authorities: list[x509.Certificate] = []
        jwt_authorities: list[JwtAuthority] = []
        wit_authorities: list[JwtAuthority] = []
        for index, jwk in enumerate(keys):
            if not isinstance(jwk, dict):
                raise BundleError(f"bundle key {index} is not a JSON object")
            use = jwk.get("use")
            if use not in (USE_X509_SVID, USE_JWT_SVID, USE_WIT_SVID) or not _understood(
                    jwk, _KNOWN_KTY if use == USE_X509_SVID else _KNOWN_JWT_KTY):
                # §4.2.1 / §4.2.2: unknown or missing kty/use -> ignore the element.
                continue
            if use == USE_X509_SVID:
                cert = _x509_entry(index, jwk)
                if cert is not None:
                    x509_authorities.append(cert)
            elif use == USE_WIT_SVID:
                # WIT-SVID §6.1: the kid of each wit-svid entry must be set.
                wit_authorities.append(_jwt_entry(index, jwk, require_kid=True))
            else:
                jwt_authorities.append(_jwt_entry(index, jwk, require_kid=True))
        return cls(
            trust_domain,
            tuple(x509_authorities),
            tuple(jwt_authorities),
            sequence_number=_optional_int(doc, "spiffe_sequence"),
            refresh_hint=_optional_int(doc, "spiffe_refresh_hint"),
            wit_authorities=tuple(wit_authorities),
        )

    def to_jwks(self) -> dict[str, Any]:
        """The SPIFFE bundle document as a JSON-ready dict.

        X.509 entries come first, then JWT entries, each in the bundle's canonical
        order; ``spiffe_sequence`` and ``spiffe_refresh_hint`` when set.

        Returns:
            ``{"keys": [...], "spiffe_sequence": n, "spiffe_refresh_hint": s}``.
        """
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            entry: dict[str, Any] = {"use": USE_X509_SVID}
            entry.update(_public_jwk(cert.public_key()))
            # X509-SVID §6: exactly one x5c (standard base64 DER, RFC 7517 §4.7), no kid.
            entry["x5c"] = [
                base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
            ]
            keys.append(entry)
        keys.extend(_jwt_jwk(auth) for auth in self.jwt_authorities)
        keys.extend(_jwt_jwk(auth, use=USE_WIT_SVID) for auth in self.wit_authorities)
        doc: dict[str, Any] = {"keys": keys}
        if self.sequence_number is not None:
            doc["spiffe_sequence"] = self.sequence_number
        if self.refresh_hint is not None:
            doc["spiffe_refresh_hint"] = self.refresh_hint
        return doc

    def to_json(self) -> bytes:
        """The SPIFFE bundle document as compact UTF-8 JSON.

        Returns:
            JSON bytes (what a bundle endpoint serves).
        """
        return json.dumps(self.to_jwks(), separators=(",", ":")).encode("utf-8")

    # -- X.509 authorities -----------------------------------------------------------

    def x509_der(self) -> bytes:
        """The X.509 authorities as concatenated DER (the Workload API's encoding)."""
        return certificates_to_der(self.x509_authorities)

    def x509_pem(self) -> bytes:
        """The X.509 authorities as PEM."""
        return certificates_to_pem(self.x509_authorities)

    @classmethod
    def from_x509_pem(cls, trust_domain: TrustDomain, data: bytes) -> Bundle:
        """A bundle of the ``CERTIFICATE`` blocks in PEM text (other blocks skipped).

        Args:
            trust_domain: whose bundle it is.
            data: PEM; empty input gives an empty bundle (as go-spiffe since #288).

        Returns:
            A bundle with only X.509 authorities.

        Raises:
            BundleError: non-empty input with no PEM block, or a bad certificate.
        """
        if not data:
            return cls(trust_domain)
        try:
            return cls(trust_domain, load_certificates_pem(data))
        except X509SvidError as exc:
            raise BundleError(f"X.509 bundle of {trust_domain}: {exc}") from None

    @classmethod
    def from_x509_der(cls, trust_domain: TrustDomain, data: bytes) -> Bundle:
        """A bundle of concatenated DER certificates.

        Args:
            trust_domain: whose bundle it is.
            data: DER certificates back to back; empty gives an empty bundle.

        Returns:
            A bundle with only X.509 authorities.

        Raises:
            BundleError: the bytes are not DER certificates.
        """
        try:
            return cls(trust_domain, load_certificates_der(data))
        except X509SvidError as exc:
            raise BundleError(f"X.509 bundle of {trust_domain}: {exc}") from None

    # -- JWT authorities ----------------------------------------------------------------

    def jwt_jwks(self) -> bytes:
        """A plain JWKS of the jwt-svid keys, each with its kid.

        This is ``JWTBundlesResponse.bundles[td]`` of the Workload API: only JWT
        keys (x509 entries have no kid, and py-spiffe's PyJWKSet would reject them),
        no ``spiffe_*`` members.

        Returns:
            UTF-8 JSON bytes.
        """
        doc = {"keys": [_jwt_jwk(auth) for auth in self.jwt_authorities]}
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    def wit_jwks(self) -> str:
        """A JWKS of the wit-svid keys, each with kid and ``use: wit-svid``.

        This is ``WITBundlesResponse.bundles[td]`` of the Workload API (a JWK set
        as text): only WIT keys (WIT-SVID §6.2), no ``spiffe_*`` members.

        Returns:
            JSON text.
        """
        doc = {"keys": [_jwt_jwk(a, use=USE_WIT_SVID) for a in self.wit_authorities]}
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_jwt_jwks(
        cls, trust_domain: TrustDomain, data: bytes | str | Mapping[str, Any]
    ) -> Bundle:
        """Parse a plain JWKS of JWT authorities (as go-spiffe's ``jwtbundle.Parse``).

        ``use`` is not looked at; every key of a known ``kty`` needs a ``kid``;
        keys of unknown ``kty`` are skipped (RFC 7517 §5: "ignore JWKs ... whose
        key types are not understood").

        Args:
            trust_domain: whose keys these are.
            data: the JSON text or decoded object.

        Returns:
            A bundle with only JWT authorities.

        Raises:
            BundleError: bad JSON, no ``keys``, a key without kid, a bad key.
        """
        doc = _load_json(data)
        keys = doc.get("keys")
        if not isinstance(keys, list):
            raise BundleError("JWKS must have a 'keys' array")
        authorities = []
        for index, jwk in enumerate(keys):
            if not isinstance(jwk, dict):
                raise BundleError(f"JWKS key {index} is not a JSON object")
            if not _understood(jwk, _KNOWN_JWT_KTY):
                continue
            authorities.append(_jwt_entry(index, jwk, require_kid=True))
        return cls(trust_domain, jwt_authorities=tuple(authorities))


# ------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------


class X509BundleSource(Protocol):
    """Where a verifier finds X.509 authorities for a trust domain."""

    def bundle_for(self, trust_domain: TrustDomain) -> Bundle | None:
        """The bundle of ``trust_domain``, or None when there is none.

        Args:
            trust_domain: the trust domain of the SVID being verified.

        Returns:
            The bundle or None.
        """
        ...


class JwtBundleSource(Protocol):
    """Where a validator finds JWT authorities for a trust domain."""

    def bundle_for(self, trust_domain: TrustDomain) -> Bundle | None:
        """The bundle of ``trust_domain``, or None when there is none.

        Args:
            trust_domain: the trust domain of the token's subject.

        Returns:
            The bundle or None.
        """
        ...


class BundleSet:
    """A fixed set of bundles, at most one per trust domain; both bundle sources."""

    def __init__(self, bundles: Iterable[Bundle] = ()) -> None:
        """Collect bundles.

        Args:
            bundles: the bundles; at most one per trust domain.

        Raises:
            BundleError: two bundles for one trust domain.
        """
        self._bundles: dict[TrustDomain, Bundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in self._bundles:
                raise BundleError(f"two bundles for trust domain {bundle.trust_domain}")
            self._bundles[bundle.trust_domain] = bundle

    def bundle_for(self, trust_domain: TrustDomain) -> Bundle | None:
        """The bundle of ``trust_domain``, or None.

        Args:
            trust_domain: the trust domain.

        Returns:
            The bundle or None.
        """
        return self._bundles.get(trust_domain)

    def __iter__(self) -> Any:
        """Iterate over the bundles, ordered by trust domain name."""
        return iter(sorted(self._bundles.values(), key=lambda b: b.trust_domain.name))

    def __len__(self) -> int:
        """The number of bundles."""
        return len(self._bundles)


# ------------------------------------------------------------------------------------
# JSON and JWK helpers
# ------------------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        # Trust Domain and Bundle §4 (bundle map) and RFC 8259 §4: duplicate names
        # make a document ambiguous; two parsers could read two different bundles.
        if key in out:
            raise BundleError(f"duplicate JSON member {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise BundleError(f"invalid JSON number {name}")


def _load_json(data: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle document exceeds {MAX_BUNDLE_BYTES} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        doc = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except UnicodeDecodeError as exc:
        raise BundleError(f"bundle document is not UTF-8: {exc}") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"bundle document is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BundleError("bundle document must be a JSON object")
    return doc


def _optional_int(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    # §4.1.1/§4.1.2: an integer (the sequence needs >= 64 bits; Python ints do).
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _understood(jwk: Mapping[str, Any], kinds: frozenset[str]) -> bool:
    """A key type we know; an AKP key only with an ML-DSA alg (its alg is its type)."""
    kty = jwk.get("kty")
    if kty not in kinds:
        return False
    return kty != mldsa.KTY or jwk.get("alg") in mldsa.ALGORITHMS


def _public_jwk(key: object) -> dict[str, Any]:
    """The public parameters of a key: kty plus crv/x/y or n/e (RFC 7518 §6), or
    alg/pub for ML-DSA (draft-ietf-cose-dilithium-11 §3)."""
    if isinstance(key, mldsa.PUBLIC_KEY_TYPES):
        return mldsa.public_jwk(key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise BundleError(f"cannot express a {type(key).__name__} as a JWK")
    # PyJWT adds key_ops for RSA; the bundle needs only the public parameters.
    return {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}


def _jwt_jwk(auth: JwtAuthority, *, use: str = USE_JWT_SVID) -> dict[str, Any]:
    entry: dict[str, Any] = {"use": use}
    entry.update(_public_jwk(auth.public_key))
    entry["kid"] = auth.key_id  # JWT-SVID §6: kid MUST be set.
    return entry


def _key_from_jwk(index: int, jwk: Mapping[str, Any]) -> JwtPublicKey:
    if _PRIVATE_MEMBERS & jwk.keys():
        raise BundleError(f"bundle key {index} contains private key material")
    if jwk.get("kty") == mldsa.KTY:
        try:
            return mldsa.public_key_from_jwk(dict(jwk))
        except InvalidKeyError as exc:
            raise BundleError(f"bundle key {index} has bad AKP parameters: {exc}") from None
    params = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    try:
        if jwk["kty"] == "EC":
            key: object = ECAlgorithm.from_jwk(params)
        else:
            key = RSAAlgorithm.from_jwk(params)
    except (JwtInvalidKeyError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle key {index} has bad {jwk['kty']} parameters: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise BundleError(f"bundle key {index} is not a public key")
    return key


def _x509_entry(index: int, jwk: Mapping[str, Any]) -> x509.Certificate | None:
    x5c = jwk.get("x5c")
    if not isinstance(x5c, list) or not x5c:
        # X509-SVID §6 / Trust Domain and Bundle §4: an x509-svid element without a
        # certificate is unusable; ignore it (go-spiffe rejects the whole bundle).
        return None
    # Several certificates: the standard says use the first (go-spiffe rejects).
    first = x5c[0]
    if not isinstance(first, str):
        raise BundleError(f"bundle key {index}: x5c[0] must be a string")
    try:
        der = base64.b64decode(first, validate=True)  # RFC 7517 §4.7: standard base64
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"bundle key {index}: x5c[0] is not a DER certificate: {exc}") from None
    has_params = any(k in jwk for k in ("crv", "x", "y", "n", "e"))
    if has_params:
        # The element's key parameters describe the certificate's key; a mismatch
        # means the publisher is broken (go-jose rejects it too).
        if not public_keys_equal(_key_from_jwk(index, jwk), cert.public_key()):
            raise BundleError(
                f"bundle key {index}: key parameters do not match the x5c certificate"
            )
    return cert


def _jwt_entry(index: int, jwk: Mapping[str, Any], *, require_kid: bool) -> JwtAuthority:
    kid = jwk.get("kid")
    if require_kid and (not isinstance(kid, str) or not kid):
        # JWT-SVID §6: the kid MUST be set; without it no token can name the key.
        raise BundleError(f"bundle key {index}: a jwt-svid key must have a non-empty 'kid'")
    key = _key_from_jwk(index, jwk)
    try:
        check_jwt_public_key(key)
    except InvalidKeyError as exc:
        raise BundleError(f"bundle key {index}: {exc}") from None
    return JwtAuthority(str(kid), key)


# ------------------------------------------------------------------------------------
# SPIFFE bundle map (Trust Domain and Bundle §5)
# ------------------------------------------------------------------------------------

BUNDLE_MAP_MEMBER = "trust_domains"


def bundle_map_to_jwks(bundles: Iterable[Bundle]) -> dict[str, Any]:
    """The SPIFFE bundle map of ``bundles`` as a JSON-ready dict.

    ``{"trust_domains": {"<name>": <bundle>, ...}}`` keyed by trust domain name,
    in name order. Each member bundle omits ``spiffe_refresh_hint``: the standard
    says producers SHOULD omit it in a map (a map is not polled per trust domain).

    Args:
        bundles: at most one bundle per trust domain.

    Returns:
        The map document.

    Raises:
        BundleError: two bundles of one trust domain.
    """
    members: dict[str, Any] = {}
    for bundle in sorted(bundles, key=lambda b: b.trust_domain.name):
        name = bundle.trust_domain.name
        if name in members:
            raise BundleError(f"two bundles for trust domain {name} in one bundle map")
        doc = bundle.to_jwks()
        doc.pop("spiffe_refresh_hint", None)
        members[name] = doc
    return {BUNDLE_MAP_MEMBER: members}


def bundle_map_to_json(bundles: Iterable[Bundle]) -> bytes:
    """The SPIFFE bundle map of ``bundles`` as compact UTF-8 JSON.

    Args:
        bundles: at most one bundle per trust domain.

    Returns:
        JSON bytes.

    Raises:
        BundleError: two bundles of one trust domain.
    """
    return json.dumps(bundle_map_to_jwks(bundles), separators=(",", ":")).encode("utf-8")


def parse_bundle_map(data: bytes | str) -> tuple[Bundle, ...]:
    """Parse a SPIFFE bundle map (Trust Domain and Bundle §5).

    The whole document is refused on any fault, so a consumer loads it as one
    state of the world or not at all: duplicate member names anywhere (the
    parser refuses them while decoding, before a later duplicate could silently
    win), a missing or non-object ``trust_domains`` (it MUST be present; ``{}``
    is allowed), a key that is not a trust domain name in canonical form
    (lowercase, no ``spiffe://``), or a member that is not a valid bundle. Each
    member's ``spiffe_refresh_hint`` is dropped: consumers must not use it.

    Args:
        data: the JSON text (bounded by :data:`MAX_BUNDLE_BYTES`).

    Returns:
        The bundles, ordered by trust domain name.

    Raises:
        BundleError: naming the fault and the trust domain it concerns.
    """
    if isinstance(data, Mapping):
        raise BundleError("parse_bundle_map takes the JSON text, so duplicates can be seen")
    doc = _load_json(data)
    members = doc.get(BUNDLE_MAP_MEMBER)
    if members is None:
        raise BundleError(f"bundle map has no '{BUNDLE_MAP_MEMBER}' member")
    if not isinstance(members, dict):
        raise BundleError(f"bundle map '{BUNDLE_MAP_MEMBER}' must be a JSON object")
    out: list[Bundle] = []
    for name, member in members.items():
        try:
            td = TrustDomain.parse(name)
        except InvalidSpiffeIdError as exc:
            raise BundleError(f"bundle map key {name!r} is not a trust domain name: {exc}") \
                from None
        if td.name != name:
            # Keys are names (example.org), not IDs and not another spelling of one:
            # two spellings of one trust domain would be a duplicate in disguise.
            raise BundleError(
                f"bundle map key {name!r} is not a trust domain name in canonical form "
                f"(want {td.name!r})")
        if not isinstance(member, dict):
            raise BundleError(f"bundle map member {name!r} is not a JSON object")
        try:
            bundle = Bundle.from_jwks(td, member)
        except BundleError as exc:
            raise BundleError(f"bundle map member {name!r}: {exc}") from None
        out.append(replace(bundle, refresh_hint=None))
    return tuple(sorted(out, key=lambda b: b.trust_domain.name))
