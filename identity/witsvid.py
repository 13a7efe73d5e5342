"""WIT-SVIDs and their proof of possession (WIT-SVID standard, Incubating).

A WIT-SVID is a WIMSE Workload Identity Token (draft-ietf-wimse-workload-creds,
"The Workload Identity Token") sub-profiled by SPIFFE (``standards/WIT-SVID.md``):
a JWS-signed JWT that binds a workload's public key (``cnf.jwk``) to its SPIFFE ID
(``sub``). It is never a bearer token (WIT-SVID §5, §7.1): whoever presents one
must also prove possession of the ``cnf`` key. Sigil accepts the proof the WIMSE
Workload Proof Token draft (draft-ietf-wimse-wpt) defines: a short-lived JWT of
``typ: wpt+jwt``, signed with the ``cnf`` key, carrying ``aud``, ``exp``, ``jti``
and ``wth`` (the SHA-256 of the WIT).

The rules, with where they come from (WIT-SVID.md at spiffe/spiffe 01b3a1e):

- WIT header: ``alg`` one of RS/ES/PS 256/384/512 (WIT-SVID §2.3, validators MUST
  reject others); ``typ`` exactly ``wit+jwt`` (§2.2); ``kid`` present (§2.1).
- WIT claims: ``sub`` the SPIFFE ID (§3.1); ``cnf.jwk`` with ``cnf.jwk.alg`` one
  of the same nine (§3.2, creds draft); ``exp`` present and not passed (§3.3);
  ``nbf`` not in the future (§3.5); ``iat`` never limits validity (§3.6); ``jti``
  and ``iss`` optional (§3.3, §3.7). Sigil also refuses an ``aud`` claim: a WIT
  names no audience, and with ``typ`` that keeps a WIT from passing where a
  JWT-SVID is expected (§7.1; JWT-SVID §3 requires ``aud``).
- The signing key: a ``use: wit-svid`` key of the bundle of ``sub``'s trust
  domain, chosen by ``kid`` (§6.2), whose type fits ``alg``.
- Proof of possession, without which a WIT-SVID MUST NOT be accepted (§4, §7.1):
  the WPT (draft-ietf-wimse-wpt): ``typ`` ``wpt+jwt``; ``alg`` string-equal to
  ``cnf.jwk.alg``; signature by the ``cnf`` key; ``aud`` matches the recipient;
  ``exp`` present, not passed, not unreasonably far ahead; ``wth`` the base64url
  SHA-256 of the WIT; ``jti`` never seen before within the proof's lifetime (a
  bounded :class:`ReplayCache`, §7.2).

Time is always passed in; the wall clock is never read here.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import heapq
import json
import math
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from identity import jwtsvid
from identity.bundle import JwtAuthority, JwtBundleSource
from identity.errors import InvalidSpiffeIdError, JwtSvidError, WitSvidError
from identity.keys import JwtPrivateKey, PrivateKey, PublicKey
from identity.spiffeid import SpiffeId

WIT_TYP = "wit+jwt"
WPT_TYP = "wpt+jwt"

# WIT-SVID §2.3: a WIT-SVID is signed with one of RS256/384/512, ES256/384/512,
# PS256/384/512, and validators MUST reject any other alg ('none', HMAC, EdDSA,
# ML-DSA among them).
WIT_ALGORITHMS: frozenset[str] = jwtsvid.STANDARD_ALGORITHMS

# WIT-SVID §3.2: cnf.jwk.alg MUST be one of the same nine (the creds draft adds: no
# 'none', nothing symmetric, ES256 supported everywhere). A WPT is signed with it.
PROOF_ALGORITHMS: frozenset[str] = jwtsvid.STANDARD_ALGORITHMS

# Bounds on what we decode (DESIGN.md: every network input is bounded).
MAX_TOKEN_BYTES = jwtsvid.MAX_TOKEN_BYTES
MAX_JTI_BYTES = 256

# WPT lifetimes "MUST be short, e.g., on the order of minutes or seconds"; a proof
# whose exp lies further ahead than this is refused ("SHOULD be rejected").
DEFAULT_MAX_PROOF_LIFETIME = dt.timedelta(minutes=5)

_EC_ALG_FOR_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "priv", "k"})


# ------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WitSvid:
    """A parsed WIT-SVID.

    Attributes:
        token: the compact serialization.
        spiffe_id: the ``sub`` claim.
        expires_at: the ``exp`` claim (aware UTC).
        issued_at: the ``iat`` claim, if any.
        jti: the ``jti`` claim, or "".
        confirmation_key: the workload's public key from ``cnf.jwk``.
        confirmation_alg: ``cnf.jwk.alg``: the algorithm every proof must use.
        claims: every claim of the token.
    """

    token: str
    spiffe_id: SpiffeId
    expires_at: dt.datetime
    issued_at: dt.datetime | None
    jti: str
    confirmation_key: PublicKey = field(compare=False)
    confirmation_alg: str
    claims: Mapping[str, Any] = field(compare=False, hash=False)


# ------------------------------------------------------------------------------------
# Workload keys as JWKs
# ------------------------------------------------------------------------------------


def proof_algorithm(key: PrivateKey | PublicKey) -> str:
    """The algorithm a workload key proves with: ES256/384/512 by curve, RS256 for RSA.

    Args:
        key: the workload key, private or public.

    Returns:
        The JWS ``alg`` that goes into ``cnf.jwk.alg``.

    Raises:
        WitSvidError: a key of no allowed algorithm.
    """
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        alg = _EC_ALG_FOR_CURVE.get(key.curve.name)
        if alg is None:
            raise WitSvidError(f"no proof algorithm for EC curve {key.curve.name}")
        return alg
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RS256"
    raise WitSvidError(f"no proof algorithm for {type(key).__name__}")


def public_jwk(key: PublicKey, *, alg: str | None = None) -> dict[str, Any]:
    """The public JWK of a workload key, with ``alg`` (what ``cnf.jwk`` holds).

    Args:
        key: the workload's public key.
        alg: the proof algorithm; by default :func:`proof_algorithm`.

    Returns:
        ``{"kty", "crv", "x", "y", "alg"}`` or ``{"kty", "n", "e", "alg"}``.
    """
    algorithm = alg or proof_algorithm(key)
    _check_proof_key_fits(algorithm, key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        raw = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        raw = RSAAlgorithm.to_jwk(key, as_dict=True)
    out = {k: v for k, v in raw.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    out["alg"] = algorithm
    return out


def private_jwk(key: PrivateKey) -> dict[str, Any]:
    """The private JWK of a workload key (``WITSVID.wit_svid_key`` of the Workload API).

    Args:
        key: the workload's private key.

    Returns:
        The RFC 7517 JWK with its private members and ``alg``.
    """
    algorithm = proof_algorithm(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raw = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        raw = RSAAlgorithm.to_jwk(key, as_dict=True)
    out = {k: v for k, v in raw.items() if k != "key_ops"}
    out["alg"] = algorithm
    return out


def load_private_jwk(jwk_doc: Mapping[str, Any] | str) -> PrivateKey:
    """A workload's private key from its JWK (as a workload reads ``wit_svid_key``).

    Args:
        jwk_doc: the JWK, decoded or as JSON text.

    Returns:
        The private key.

    Raises:
        WitSvidError: not an EC or RSA private JWK.
    """
    try:
        doc = json.loads(jwk_doc) if isinstance(jwk_doc, str) else dict(jwk_doc)
    except ValueError as exc:
        raise WitSvidError(f"workload JWK is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise WitSvidError("workload JWK must be a JSON object")
    try:
        if doc.get("kty") == "EC":
            key: object = ECAlgorithm.from_jwk(doc)
        elif doc.get("kty") == "RSA":
            key = RSAAlgorithm.from_jwk(doc)
        else:
            raise WitSvidError(f"unsupported workload key type {doc.get('kty')!r}")
    except (jwt.InvalidKeyError, ValueError, KeyError, TypeError) as exc:
        raise WitSvidError(f"bad workload private JWK: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise WitSvidError("the workload JWK holds no private key")
    return key


def _check_proof_key_fits(alg: str, key: object) -> None:
    if alg not in PROOF_ALGORITHMS:
        raise WitSvidError(f"proof algorithm {alg!r} is not allowed")
    try:
        jwtsvid.check_key_fits(alg, key)
    except JwtSvidError as exc:
        raise WitSvidError(f"cnf key does not fit {alg}: {exc}") from None


def _confirmation(claims: Mapping[str, Any]) -> tuple[PublicKey, str]:
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict):
        raise WitSvidError("token missing cnf claim")
    jwk_doc = cnf.get("jwk")
    if not isinstance(jwk_doc, dict):
        raise WitSvidError("token cnf claim has no jwk")
    alg = jwk_doc.get("alg")
    if not isinstance(alg, str) or not alg:
        # creds draft: "Within the jwk object, an `alg` field MUST be present."
        raise WitSvidError("token cnf.jwk has no alg")
    if alg == "none" or alg.startswith("HS") or alg not in PROOF_ALGORITHMS:
        raise WitSvidError(f"token cnf.jwk.alg {alg!r} is not an allowed signature algorithm")
    if _PRIVATE_MEMBERS & jwk_doc.keys():
        raise WitSvidError("token cnf.jwk contains private key material")
    params = {k: v for k, v in jwk_doc.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    try:
        if jwk_doc.get("kty") == "EC":
            key: object = ECAlgorithm.from_jwk(params)
        elif jwk_doc.get("kty") == "RSA":
            key = RSAAlgorithm.from_jwk(params)
        else:
            raise WitSvidError(f"token cnf.jwk has unsupported kty {jwk_doc.get('kty')!r}")
    except (jwt.InvalidKeyError, ValueError, KeyError, TypeError) as exc:
        raise WitSvidError(f"token cnf.jwk is not a valid key: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise WitSvidError("token cnf.jwk is not a public key")
    _check_proof_key_fits(alg, key)
    return key, alg


# ------------------------------------------------------------------------------------
# Issuing
# ------------------------------------------------------------------------------------


def _aware(value: dt.datetime, what: str) -> dt.datetime:
    return jwtsvid.aware_utc(value, what, WitSvidError)


def sign_wit_svid(
    *,
    spiffe_id: SpiffeId,
    workload_key: PublicKey,
    key: JwtPrivateKey,
    key_id: str,
    issued_at: dt.datetime,
    expires_at: dt.datetime,
    jti: str | None = None,
    not_before: dt.datetime | None = None,
    issuer: str | None = None,
) -> str:
    """Sign a WIT-SVID (WIT-SVID §4: alg, typ, kid; sub, exp, cnf; jti, nbf, iat).

    Header ``{alg, kid, typ: "wit+jwt"}``; claims ``sub``, ``exp``, ``nbf``,
    ``iat``, ``jti`` (random when not given: WIT-SVID §3.3, for audit
    correlation), ``cnf.jwk`` (the workload key with its ``alg``) and ``iss`` only
    when given. No ``aud``.

    Args:
        spiffe_id: the workload's SPIFFE ID; must have a path.
        workload_key: the workload's public key, bound into ``cnf.jwk``.
        key: the issuer's signing key.
        key_id: the kid of that key in the bundle (never empty: WIT-SVID §2.1).
        issued_at: ``iat`` (aware).
        expires_at: ``exp`` (aware), after ``issued_at``.
        jti: the token's unique id; random by default.
        not_before: ``nbf``; by default ``issued_at`` (WIT-SVID §3.5 allows a
            little earlier, for clock skew).
        issuer: an ``iss`` claim. WIT-SVID §3.7: it SHOULD NOT be an OpenID
            Connect discovery issuer (a WIT must not pass for an ID token), so
            Sigil's server sets none.

    Returns:
        The compact serialization.

    Raises:
        WitSvidError: an empty kid, a root ID, an empty lifetime, a key of no
            allowed algorithm.
    """
    issued_at, expires_at = jwtsvid.check_issue(spiffe_id, key_id, issued_at, expires_at,
                                                "WIT-SVID", WitSvidError)
    try:
        alg = jwtsvid.default_algorithm(key)
    except JwtSvidError as exc:
        raise WitSvidError(str(exc)) from None
    if alg not in WIT_ALGORITHMS:
        raise WitSvidError(f"a WIT-SVID cannot be signed with {alg} (WIT-SVID §2.3)")
    nbf = _aware(not_before, "not_before") if not_before is not None else issued_at
    claims: dict[str, Any] = {
        "sub": str(spiffe_id),
        "exp": math.floor(expires_at.timestamp()),
        "nbf": math.floor(nbf.timestamp()),
        "iat": math.floor(issued_at.timestamp()),
        "jti": jti or secrets.token_urlsafe(16),
        "cnf": {"jwk": public_jwk(workload_key)},
    }
    if issuer:
        claims["iss"] = issuer
    signing_key: Any = key
    return jwt.encode(claims, signing_key, algorithm=alg,
                      headers={"kid": key_id, "typ": WIT_TYP})


def wit_hash(wit_token: str) -> str:
    """``wth``: base64url (unpadded) SHA-256 of the ASCII WIT (draft-ietf-wimse-wpt).

    Args:
        wit_token: the WIT's compact serialization.

    Returns:
        The hash as the WPT carries it.

    Raises:
        WitSvidError: the token is not ASCII (so not a compact JWS).
    """
    if not wit_token.isascii():
        raise WitSvidError("a WIT is ASCII (a JWS compact serialization)")
    digest = hashlib.sha256(wit_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign_wpt(
    *,
    wit_token: str,
    key: PrivateKey,
    audience: str,
    expires_at: dt.datetime,
    jti: str | None = None,
) -> str:
    """Sign a Workload Proof Token for a WIT (what the presenting workload does).

    Args:
        wit_token: the WIT this proves possession for (hashed into ``wth``).
        key: the workload's private key (the one in the WIT's ``cnf.jwk``).
        audience: the recipient, e.g. the HTTP target URI without query.
        expires_at: ``exp``; keep it seconds to minutes ahead.
        jti: unique per proof; random by default.

    Returns:
        The WPT's compact serialization.
    """
    if not audience:
        raise WitSvidError("a proof needs an audience")
    claims = {
        "aud": audience,
        "exp": math.floor(_aware(expires_at, "expires_at").timestamp()),
        "jti": jti or secrets.token_urlsafe(16),
        "wth": wit_hash(wit_token),
    }
    signing_key: Any = key
    return jwt.encode(claims, signing_key, algorithm=proof_algorithm(key),
                      headers={"typ": WPT_TYP})


# ------------------------------------------------------------------------------------
# Validating
# ------------------------------------------------------------------------------------


def _typ_is(header: Mapping[str, Any], wanted: str, *, exact: bool = False) -> bool:
    typ = header.get("typ")
    if not isinstance(typ, str):
        return False
    if exact:
        return typ == wanted
    # RFC 7515 §4.1.9: the "application/" prefix may be omitted, and media types
    # compare case-insensitively.
    value = typ.lower()
    return value == wanted or value == f"application/{wanted}"


def _unverified(token: str, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(token, str) or not token:
        raise WitSvidError(f"{what} must be a non-empty string")
    if len(token) > MAX_TOKEN_BYTES:
        raise WitSvidError(f"{what} of {len(token)} bytes exceeds {MAX_TOKEN_BYTES}")
    # RFC 7515 §7.1: the compact serialization is base64url parts and dots, so
    # ASCII; wth hashes the token's ASCII bytes.
    if not token.isascii() or token.count(".") != 2:
        raise WitSvidError(f"{what} is not a JWS compact serialization")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise WitSvidError(f"cannot parse {what}: {exc}") from None
    if "crit" in header:
        raise WitSvidError(f"{what} header has critical extensions {header['crit']!r}")
    return header, claims


def _numeric_date(claims: Mapping[str, Any], name: str, what: str) -> dt.datetime | None:
    return jwtsvid.numeric_date(claims, name, what, WitSvidError)


def _wit_from_claims(token: str, header: Mapping[str, Any],
                     claims: Mapping[str, Any]) -> WitSvid:
    alg = header.get("alg")
    if alg not in WIT_ALGORITHMS:
        raise WitSvidError(f"token algorithm {alg!r} is not allowed for a WIT-SVID")
    # WIT-SVID §2.2: typ "MUST be present and MUST be set to `wit+jwt`".
    if not _typ_is(header, WIT_TYP, exact=True):
        raise WitSvidError(f"token header typ {header.get('typ')!r} is not {WIT_TYP}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise WitSvidError("token header missing key id (kid is required for a WIT-SVID)")
    if "aud" in claims:
        raise WitSvidError("token has an aud claim: a WIT-SVID carries no audience")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise WitSvidError("token missing subject claim")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except InvalidSpiffeIdError as exc:
        raise WitSvidError(f"token has an invalid subject claim: {exc}") from None
    if not spiffe_id.has_path:
        raise WitSvidError(f"token subject {spiffe_id} is a trust domain, not a workload")
    expires_at = _numeric_date(claims, "exp", "token")
    if expires_at is None:
        raise WitSvidError("token missing exp claim")
    jti = claims.get("jti", "")
    if not isinstance(jti, str):
        raise WitSvidError(f"token jti claim must be a string, got {jti!r}")
    key, cnf_alg = _confirmation(claims)
    return WitSvid(
        token=token, spiffe_id=spiffe_id, expires_at=expires_at,
        issued_at=_numeric_date(claims, "iat", "token"), jti=jti,
        confirmation_key=key, confirmation_alg=cnf_alg, claims=dict(claims),
    )


def parse_wit_svid_insecure(token: str) -> WitSvid:
    """Parse a WIT-SVID without checking its signature or times.

    For a token from a trusted source (the agent reading the server's answer).
    Every header and claim rule still applies.

    Raises:
        WitSvidError: naming the broken rule.
    """
    header, claims = _unverified(token, "token")
    return _wit_from_claims(token, header, claims)


def _check_times(claims: Mapping[str, Any], expires_at: dt.datetime, now: dt.datetime,
                 slack: dt.timedelta, what: str) -> None:
    if now >= expires_at + slack:
        raise WitSvidError(
            f"{what} has expired (exp {expires_at.isoformat()}, now {now.isoformat()})")
    nbf = _numeric_date(claims, "nbf", what)
    if nbf is not None and now + slack < nbf:
        raise WitSvidError(f"{what} is not valid before {nbf.isoformat()}")
    # WIT-SVID §3.6: iat "MUST NOT be used for limiting the earliest validity"
    # (nbf is); it is only checked to be a NumericDate.
    _numeric_date(claims, "iat", what)


def validate_wit_svid(
    token: str,
    *,
    bundles: JwtBundleSource,
    now: dt.datetime,
    leeway: float = 0,
) -> WitSvid:
    """Validate a WIT-SVID's form, signature and times (no proof of possession).

    A WIT-SVID alone authenticates nothing (WIT-SVID §7.1): relying parties call
    :func:`verify_presentation`, which calls this and then checks the proof.

    Args:
        token: the compact JWS.
        bundles: where to find a trust domain's bundle; only its ``wit-svid``
            keys are used.
        now: the validation time (aware).
        leeway: seconds of clock skew tolerated.

    Returns:
        The validated WIT-SVID.

    Raises:
        WitSvidError: naming the failed check.
    """
    if leeway < 0:
        raise WitSvidError(f"leeway must not be negative, got {leeway!r}")
    header, claims = _unverified(token, "token")
    wit = _wit_from_claims(token, header, claims)
    td = wit.spiffe_id.trust_domain
    bundle = bundles.bundle_for(td)
    if bundle is None:
        raise WitSvidError(f"no bundle found for trust domain {td}")
    kid = header["kid"]
    authority: JwtAuthority | None = bundle.wit_authority(kid)
    if authority is None:
        # WIT-SVID §6.2: only wit-svid keys validate WIT-SVIDs; a jwt-svid key
        # with the same kid does not count.
        raise WitSvidError(f"no WIT authority {kid!r} found for trust domain {td}")
    alg = header["alg"]
    try:
        jwtsvid.check_key_fits(alg, authority.public_key)
    except JwtSvidError as exc:
        raise WitSvidError(str(exc)) from None
    verify_key: Any = authority.public_key
    try:
        jwt.decode(token, verify_key, algorithms=[alg], options=jwtsvid.PYJWT_OPTIONS)
    except jwt.InvalidSignatureError:
        raise WitSvidError(
            f"token signature does not verify with WIT authority {kid!r} of {td}") from None
    except jwt.PyJWTError as exc:
        raise WitSvidError(f"token failed verification: {exc}") from None
    _check_times(claims, wit.expires_at, _aware(now, "now"), dt.timedelta(seconds=leeway),
                 "token")
    return wit


class ReplayCache:
    """Proof ids seen within their lifetime, bounded.

    draft-ietf-wimse-wpt: check "that the value of the `jti` claim has not been
    used before in the time window in which the respective WPT would be considered
    valid". An id is kept until its proof expires. When the cache is full of
    unexpired ids it refuses new proofs rather than forget one (forgetting would
    let that proof be replayed); with proofs of at most a few minutes this bounds
    the accepted proof rate at ``max_entries`` per proof lifetime.

    Thread-safe.

    Args:
        max_entries: the most ids kept.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self._seen: dict[str, dt.datetime] = {}
        self._expiries: list[tuple[dt.datetime, str]] = []  # a heap
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, key: str, expires_at: dt.datetime, now: dt.datetime) -> None:
        """Remember ``key`` until ``expires_at``; refuse it if already seen.

        Raises:
            WitSvidError: a replay, or the cache is full.
        """
        with self._lock:
            while self._expiries and self._expiries[0][0] <= now:
                _, old = heapq.heappop(self._expiries)
                del self._seen[old]
            if key in self._seen:
                raise WitSvidError("proof has been used before (replayed jti)")
            if len(self._seen) >= self.max_entries:
                raise WitSvidError("too many proofs in flight; try again shortly")
            self._seen[key] = expires_at
            heapq.heappush(self._expiries, (expires_at, key))


def verify_presentation(
    wit_token: str,
    proof: str | None,
    *,
    bundles: JwtBundleSource,
    audience: str | Sequence[str],
    now: dt.datetime,
    replay_cache: ReplayCache,
    max_proof_lifetime: dt.timedelta = DEFAULT_MAX_PROOF_LIFETIME,
    leeway: float = 0,
) -> WitSvid:
    """Authenticate a workload by its WIT-SVID and a Workload Proof Token.

    Order: the WIT (:func:`validate_wit_svid`); a proof is present (WIT-SVID §5:
    never a bearer token); the proof's form; ``typ`` ``wpt+jwt``; ``alg``
    string-equal to ``cnf.jwk.alg``; the signature by the ``cnf`` key; ``aud``
    names this recipient; ``exp`` present, not passed, at most
    ``max_proof_lifetime`` ahead; ``wth`` is the WIT's hash; ``jti`` present and
    not seen before (``replay_cache``).

    Args:
        wit_token: the WIT-SVID.
        proof: the WPT (None or "" is refused).
        bundles: as for :func:`validate_wit_svid`.
        audience: what this recipient accepts as ``aud`` (one value or several
            aliases of its target URI).
        now: the validation time (aware).
        replay_cache: where proof ids are remembered.
        max_proof_lifetime: how far ahead a proof's ``exp`` may lie.
        leeway: seconds of clock skew tolerated.

    Returns:
        The validated WIT-SVID (its ``spiffe_id`` is the authenticated workload).

    Raises:
        WitSvidError: naming the failed check.
    """
    accepted = (audience,) if isinstance(audience, str) else tuple(audience)
    if not accepted or not all(accepted):
        raise WitSvidError("an expected audience is required")
    now = _aware(now, "now")
    wit = validate_wit_svid(wit_token, bundles=bundles, now=now, leeway=leeway)
    if not proof:
        raise WitSvidError(
            "WIT-SVID presented without proof of possession; it must not be used as a "
            "bearer token")
    header, claims = _unverified(proof, "proof")
    if not _typ_is(header, WPT_TYP):
        raise WitSvidError(f"proof header typ {header.get('typ')!r} is not {WPT_TYP}")
    alg = header.get("alg")
    if alg != wit.confirmation_alg:
        raise WitSvidError(
            f"proof algorithm {alg!r} does not match the WIT's cnf.jwk.alg "
            f"{wit.confirmation_alg!r}")
    verify_key: Any = wit.confirmation_key
    try:
        jwt.decode(proof, verify_key, algorithms=[wit.confirmation_alg],
                   options=jwtsvid.PYJWT_OPTIONS)
    except jwt.InvalidSignatureError:
        raise WitSvidError("proof signature does not verify with the WIT's cnf key") from None
    except jwt.PyJWTError as exc:
        raise WitSvidError(f"proof failed verification: {exc}") from None
    aud = claims.get("aud")
    auds = (aud,) if isinstance(aud, str) else aud
    if not isinstance(auds, (list, tuple)) or not any(a in accepted for a in auds):
        raise WitSvidError(f"proof aud {aud!r} does not name this recipient {list(accepted)}")
    expires_at = _numeric_date(claims, "exp", "proof")
    if expires_at is None:
        raise WitSvidError("proof missing exp claim")
    slack = dt.timedelta(seconds=leeway)
    _check_times(claims, expires_at, now, slack, "proof")
    if expires_at - now > max_proof_lifetime + slack:
        raise WitSvidError(
            f"proof expires too far ahead ({expires_at.isoformat()}; at most "
            f"{max_proof_lifetime} allowed)")
    wth = claims.get("wth")
    # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError).
    if not isinstance(wth, str) or not secrets.compare_digest(
            wth.encode("utf-8"), wit_hash(wit_token).encode("ascii")):
        raise WitSvidError("proof wth claim does not match the hash of the WIT")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise WitSvidError("proof missing jti claim")
    if len(jti.encode()) > MAX_JTI_BYTES:
        raise WitSvidError(f"proof jti longer than {MAX_JTI_BYTES} bytes")
    # draft-ietf-wimse-wpt: jti is unique "at least within the scope of the
    # sender", so the sender (sub) is part of the key.
    replay_cache.check_and_remember(f"{wit.spiffe_id}\x00{jti}", expires_at + slack, now)
    return wit
